"""The Ollama export: a Modelfile per GGUF (modelfile), its TEMPLATE from the model's family (template),
rendered with Go as the Ollama server renders it (gotemplate, template_render.go) and checked (checks)."""
