"""The YAML compiler: schema, stage pipeline, build directories, engine builders."""
