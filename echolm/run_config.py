"""The `run` section of the configuration: what `echolm run` does (which stages, starting from
what). Kept beside echolm/config.py, which holds every other section."""

from __future__ import annotations

from dataclasses import dataclass, field

from echolm.config_checks import check_stages
from echolm.errors import EchoError

PIPELINE = ("tokenizer", "pretrain", "sft", "rl", "rank", "rm", "rlhf", "dpo", "eval")


@dataclass
class RunConfig:
    """What `echolm run` does: which stages, starting from what."""

    stages: list[str] = field(default_factory=lambda: list(PIPELINE))  # run these, in order
    # a model to start from instead of training one: a .gguf file or a Hugging Face folder,
    # imported into the run directory first (`echolm import`); "" = train from scratch
    source: str = ""
    chat_format: str = "auto"  # the imported model's chat format: auto | source | echo
    # another run directory shown beside this one in the report (e.g. the cpu preset's run)
    beside: str = ""

    def validate(self, section: str = "run") -> None:
        check_stages(f"{section}.stages", self.stages, PIPELINE)
        if self.chat_format not in ("auto", "source", "echo"):
            raise EchoError(f"{section}.chat_format={self.chat_format!r}: expected auto, "
                            "source or echo")
