"""Compile every glmc.kernels Triton kernel for sm_90 on a machine without a GPU (catches compile errors and prints
registers/spills before a device visit). Needs triton installed; no CUDA device."""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget

from glmc.kernels import attention, norm, rotary, sampling
from glmc.kernels import quantized_linear as ql
from glmc.kernels.partials import split_block

TARGET = GPUTarget("cuda", 90, 32)


def compile_one(name, fn, sig: dict, const: dict, num_warps=4, num_stages=3):
    full = dict(sig)
    full.update({k: "constexpr" for k in const})
    src = triton.compiler.ASTSource(fn=fn, signature=full, constexprs=const)
    c = triton.compile(src, target=TARGET, options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = c.asm["ptx"]
    spills = ".local" in ptx
    print(f"{name:60s} ok  shared={c.metadata.shared:6d}  local-mem={'YES' if spills else 'no'}")
    return c


def main() -> int:
    i32, f32 = "i32", "fp32"
    for bits, wty in ((16, "*fp16"), (8, "*i8"), (4, "*u8")):
        for group in ((0,) if bits == 16 else (0, 128)):
            for bn, bk in ((32, 128), (64, 128), (16, 256)):
                if group and bk > group:
                    continue
                sig = dict(x_ptr="*fp16", w_ptr=wty, s_ptr="*fp16", out_ptr="*fp32", N=i32, K=i32, stride_xm=i32,
                           stride_wn=i32, stride_sn=i32, k_split=i32)
                for magic in ((False,) if bits == 16 else (False, True)):
                    compile_one(f"fma b{bits} g{group} {bn}x{bk} magic={magic}", ql._gemv_fma_kernel, sig,
                                dict(BITS=bits, GROUP=group, BLOCK_N=bn, BLOCK_K=bk, MAGIC=magic), num_stages=2)
                sig = dict(x_ptr="*fp16", w_ptr=wty, s_ptr="*fp16", out_ptr="*fp32", M=i32, N=i32, K=i32,
                           stride_xm=i32, stride_wn=i32, stride_sn=i32, k_split=i32)
                for magic in ((False,) if bits == 16 else (False, True)):
                    compile_one(f"dot b{bits} g{group} {bn}x{bk} magic={magic}", ql._gemv_dot_kernel, sig,
                                dict(BITS=bits, GROUP=group, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, MAGIC=magic))
            for bn, swiglu, prefetch in ((32, False, True), (64, True, True), (128, True, False)):
                if bits == 16:
                    continue
                sig = dict(x_ptr="*fp16", xw_ptr="*i32", w_ptr="*i32", s_ptr="*fp16",
                           out_ptr="*fp16" if swiglu else "*fp32", N=i32, kw=i32, stride_xm=i32, stride_wn=i32,
                           stride_sn=i32, w_split=i32)
                compile_one(f"wo b{bits} g{group} {bn} swiglu={swiglu} prefetch={prefetch}", ql._gemv_wo_kernel,
                            sig, dict(BITS=bits, GROUP=group, BLOCK_N=bn, BLOCK_K=128, EVEN_K=True, ASM=True,
                                      PREFETCH=prefetch, PDL=True, SWIGLU=swiglu))
            for tiled in ((False, True) if bits != 16 else ()):
                compile_one(f"dequant b{bits} g{group} tiled={tiled}", ql._dequantize_kernel,
                            dict(w_ptr=wty, s_ptr="*fp16", out_ptr="*fp16", N=i32, K=i32, stride_wn=i32,
                                 stride_sn=i32), dict(BITS=bits, GROUP=group, TILED=tiled, BLOCK_N=32, BLOCK_K=128))
    for split in (1, 4, 33):
        sb = split_block(split, 4096 // 512)
        compile_one(f"add_rmsnorm split {split}", norm._add_rmsnorm_kernel,
                    dict(part_ptr="*fp32", res_ptr="*fp16", w_ptr="*fp16", out_ptr="*fp16", M=i32, H=i32, eps=f32),
                    dict(SPLIT=split, SB=sb, BLOCK_H=4096, PDL=True), num_warps=16)
        compile_one(f"swiglu split {split}", norm._swiglu_kernel,
                    dict(part_ptr="*fp32", out_ptr="*fp16", M=i32, F=i32),
                    dict(SPLIT=split, SB=split_block(split, 8), BLOCK=1024, INTERLEAVED=True, PDL=True))
        compile_one(f"qkv_rotary_append split {split}", rotary._qkv_rotary_append_kernel,
                    dict(part_ptr="*fp32", bias_ptr="*fp16", pos_ptr="*i64", cos_ptr="*fp16", sin_ptr="*fp16",
                         q_ptr="*fp16", k_ptr="*fp16", v_ptr="*fp16", past_ptr="*i32", ks_ptr="*fp32",
                         vs_ptr="*fp32", kn_ptr="*fp16", vn_ptr="*fp16", M=i32, S=i32, NQKV=i32, stride_cb=i32,
                         stride_ch=i32, stride_ct=i32),
                    dict(SPLIT=split, SB=split_block(split, 2), HQ=32, HKV=2, D=128, HALF_R=32, HAS_BIAS=True,
                         KV8=False, PDL=True), num_warps=1)
        if split == 1:
            for kv8 in (False, True):
                compile_one(f"decode_attention kv8={kv8}", attention._decode_attention_kernel,
                            dict(q_ptr="*fp16", k_ptr="*i8" if kv8 else "*fp16", v_ptr="*i8" if kv8 else "*fp16",
                                 start_ptr="*i32", past_ptr="*i32", m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32",
                                 scale=f32, ks_ptr="*fp32", vs_ptr="*fp32", kn_ptr="*fp16", vn_ptr="*fp16",
                                 stride_cb=i32, stride_ch=i32, stride_ct=i32, P=i32),
                            dict(HQ=32, HKV=2, G=16, BLOCK_G=16, D=128, BLOCK_T=64, KV8=kv8, PDL=True))
            compile_one("combine", attention._combine_kernel,
                        dict(m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32", out_ptr="*fp16", start_ptr="*i32",
                             past_ptr="*i32", P=i32), dict(HQ=32, D=128, BLOCK_T=64, BLOCK_C=64, PDL=True),
                        num_warps=2)
        compile_one(f"logits_argmax split {split}", sampling._logits_argmax_kernel,
                    dict(part_ptr="*fp32", logits_ptr="*fp32", bmax_ptr="*fp32", bidx_ptr="*i32", M=i32, V=i32,
                         NB=i32), dict(SPLIT=split, SB=split_block(split, 16), ROUND=1, BLOCK=2048, PDL=True))
    compile_one("argmax_final", sampling._argmax_final_kernel,
                dict(bmax_ptr="*fp32", bidx_ptr="*i32", ids_ptr="*i64", NB=i32), dict(BLOCK_B=32, PDL=True),
                num_warps=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
