"""axolotl_m1: the Axolotl plugin for M1 hybrid Mamba models.

Use it from an Axolotl YAML::

    plugins:
      - axolotl_m1.M1Plugin
    base_model: /path/to/teacher        # or an m1_hybrid checkpoint
    model_type: m1_hybrid               # accepted: the plugin maps it to AutoModelForCausalLM
    m1_attn_layers: [3, 8, 13, 18, 23, 27]
    m1_distill: true                    # stage 1; false (default) = SFT

See ``axolotl_m1/README.md`` for every key, packing and FSDP notes.
"""

from .plugin import M1Plugin

__all__ = ["M1Plugin"]
