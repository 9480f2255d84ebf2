"""Optional integrations with other libraries.

Nothing here is imported by ``import cpuattn``; import the submodule you need
(e.g. ``cpuattn.integrations.hf`` for Hugging Face transformers, which
imports torch and transformers).
"""
