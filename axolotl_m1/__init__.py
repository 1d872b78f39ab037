"""axolotl_m1: the Axolotl plugin for M1 hybrid Mamba models.

Use it from an Axolotl YAML::

    plugins:
      - axolotl_m1.M1Plugin
    base_model: /path/to/teacher        # or an m1_hybrid checkpoint
    model_type: m1_hybrid               # accepted: the plugin maps it to AutoModelForCausalLM
    m1_attn_layers: [3, 8, 13, 18, 23, 27]
    m1_distill: true                    # stage 1; false (default) = SFT

See ``axolotl_m1/README.md`` for every key, packing and FSDP notes.

``M1Plugin`` is imported on first access (Axolotl resolves ``axolotl_m1.M1Plugin`` by importing
this package and reading the attribute): ``axolotl_m1.plugin`` imports Axolotl, while
``axolotl_m1.loss``, ``axolotl_m1.teacher`` and ``axolotl_m1.data`` must import where Axolotl is
not installed (``benchmarks/distill_gpu.py`` on a bare GPU machine).
"""

__all__ = ["M1Plugin"]


def __getattr__(name: str):
    if name == "M1Plugin":
        from .plugin import M1Plugin

        return M1Plugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
