"""Prompt construction: the model's chat template around the problem plus the paper's instruction.

The M1 / DeepScaleR prompt is the problem followed by :data:`PAPER_SUFFIX`, sent as one user turn
through the tokenizer's chat template with the generation prompt appended. Everything is
configurable through :class:`PromptConfig`.

Example::

    >>> from m1_eval.prompting import PromptConfig, user_message
    >>> user_message("What is 1+1?", PromptConfig())
    "What is 1+1? Let's think step by step and output the final answer within \\\\boxed{}."
    >>> user_message("2+2?", PromptConfig(template="Q: {problem}\\nA:", suffix=""))
    'Q: 2+2?\\nA:'
"""

from __future__ import annotations

from dataclasses import asdict
from dataclasses import dataclass

PAPER_SUFFIX = "Let's think step by step and output the final answer within \\boxed{}."


@dataclass
class PromptConfig:
    """How a problem becomes a prompt.

    - ``template``: format string with ``{problem}``; the user message is ``template`` then ``suffix``.
    - ``suffix``: appended after a space (default: the paper's instruction); ``""`` for none.
    - ``system``: optional system message.
    - ``chat_template``: apply the tokenizer's chat template (``add_generation_prompt=True``);
      when ``False`` (or the tokenizer has none) the user message is the raw prompt.
    """

    template: str = "{problem}"
    suffix: str = PAPER_SUFFIX
    system: str | None = None
    chat_template: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def user_message(problem: str, config: PromptConfig) -> str:
    """The user-turn text for ``problem``."""
    text = config.template.format(problem=problem)
    return f"{text} {config.suffix}" if config.suffix else text


def build_prompt(problem: str, tokenizer, config: PromptConfig | None = None) -> str:
    """The full prompt string: chat template applied when asked for and available.

    Example::

        >>> class Tok:  # any object with a chat template behaves the same way
        ...     chat_template = None
        >>> build_prompt("1+1?", Tok(), PromptConfig(suffix=""))
        '1+1?'
    """
    config = config or PromptConfig()
    msg = user_message(problem, config)
    if not config.chat_template or tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return msg
    messages = ([{"role": "system", "content": config.system}] if config.system else []) + [
        {"role": "user", "content": msg}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
