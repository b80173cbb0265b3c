"""The stage scripts (`prepare`, `experts`, `search`, `finetune`, `export`, `evaluate`, `predict`, `validate`,
`inspect_run`), the orchestrators (`run`, `report`), the CLI and the Python API; their building blocks live in
`sentimerge.pipeline.core`."""
