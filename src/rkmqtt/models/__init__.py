"""Models a user can get and choose: references (`hf://owner/repo[/file]` or a path), the file picked
for an engine, downloads from Hugging Face (checked, with progress), the local store under
`models_dir`, and the served models by name (docs/architecture.md, "Models")."""
