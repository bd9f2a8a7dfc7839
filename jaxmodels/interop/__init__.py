"""Hugging Face (safetensors) import and export: `jaxmodels.interop.hf` (`load_hf`, `save_hf`, and the command line
`python -m jaxmodels.interop.hf import|export`). Nothing below `interop` imports it."""
