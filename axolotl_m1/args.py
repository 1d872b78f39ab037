"""The YAML keys of the M1 Axolotl plugin (all top-level, all declared here).

Axolotl merges this pydantic model into its config schema (``get_input_args``); a key that is not
declared here is silently dropped after validation, so every ``m1_*`` key the plugin reads is
listed below. Defaults are applied by :func:`axolotl_m1.plugin.settings` (``None`` means "default").

The table of keys, defaults and meanings is in ``axolotl_m1/README.md``.
"""

from typing import Literal

from pydantic import BaseModel
from pydantic import Field
from pydantic import field_validator
from pydantic import model_validator


class M1Args(BaseModel):
    """Input args of :class:`axolotl_m1.M1Plugin` (flat, top-level YAML keys)."""

    m1_attn_layers: list[int] | Literal["auto"] | None = Field(
        default=None,
        json_schema_extra={
            "description": "Attention layers of a student built on the fly from base_model, or 'auto': convert every "
            "layer, align all mixers (m1_align_steps), keep attention where the aligned mixer costs the teacher most"
        },
    )
    m1_num_attn_layers: int | None = Field(
        default=None,
        ge=1,
        json_schema_extra={"description": "How many attention layers m1_attn_layers: auto keeps (default ~25%)"},
    )
    m1_d_state: int | None = Field(default=None, json_schema_extra={"description": "SSM state size (default 16)"})
    m1_student_init_dir: str | None = Field(
        default=None,
        json_schema_extra={"description": "Folder of the converted student (default {output_dir}/m1_student_init)"},
    )
    m1_distill: bool | None = Field(
        default=None, json_schema_extra={"description": "Online distillation from m1_teacher_model"}
    )
    m1_teacher_model: str | None = Field(default=None, json_schema_extra={"description": "Teacher folder or hub id"})
    m1_teacher_dtype: Literal["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"] | None = None
    m1_teacher_attn_implementation: str | None = None
    m1_kl_weight: float | None = Field(default=None, ge=0.0)
    m1_ce_weight: float | None = Field(default=None, ge=0.0)
    m1_kl_direction: Literal["reverse", "forward"] | None = None
    m1_kl_temperature: float | None = Field(default=None, gt=0.0)
    m1_kl_chunk_size: int | None = Field(default=None, ge=1)
    m1_align_steps: int | None = Field(
        default=None,
        ge=0,
        json_schema_extra={
            "description": "Layer-wise alignment steps of the Mamba mixers to the teacher's attention before "
            "distillation (fresh runs only; default 0 = off; needs m1_distill)"
        },
    )
    m1_align_lr: float | None = Field(
        default=None, gt=0.0, json_schema_extra={"description": "Learning rate of the alignment steps (default 1e-3)"}
    )

    @field_validator("m1_attn_layers")
    @classmethod
    def _layers_sorted_unique(cls, value):
        if value is None or value == "auto":
            return value
        if len(set(value)) != len(value):
            raise ValueError(f"m1_attn_layers has duplicates: {value}")
        return sorted(value)

    @model_validator(mode="after")
    def _check_distill(self):
        if self.m1_attn_layers == "auto" and not (self.m1_distill and self.m1_align_steps):
            raise ValueError(
                "m1_attn_layers: auto chooses the attention layers from aligned mixers: set m1_distill: true and "
                "m1_align_steps > 0 (e.g. 200), or list the layers (m1_attn_layers: [3, 8, ...])"
            )
        if self.m1_num_attn_layers is not None and self.m1_attn_layers != "auto":
            raise ValueError("m1_num_attn_layers only applies to m1_attn_layers: auto; drop it or set auto")
        if self.m1_distill:
            if not self.m1_teacher_model:
                raise ValueError(
                    "m1_distill: true needs a teacher: set m1_teacher_model (a folder or hub id with the student's "
                    "tokenizer), or build the student from the teacher with base_model: <teacher> + m1_attn_layers"
                )
            kl = 1.0 if self.m1_kl_weight is None else self.m1_kl_weight
            ce = 0.0 if self.m1_ce_weight is None else self.m1_ce_weight
            if kl == 0.0 and ce == 0.0:
                raise ValueError("m1_kl_weight and m1_ce_weight are both 0: nothing to train")
        elif self.m1_align_steps:
            raise ValueError(
                f"m1_align_steps: {self.m1_align_steps} aligns the Mamba mixers to a teacher's attention, which needs "
                "distillation: set m1_distill: true (with m1_teacher_model, or base_model: <teacher> + "
                "m1_attn_layers), or set m1_align_steps: 0"
            )
        return self
