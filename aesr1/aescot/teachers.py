"""The teachers the distill stage can ask: each critiques an image given only its score band (never the score).

One module per teacher, each with its params config: :mod:`aesr1.aescot.teacher_analytic`
(the offline default) and :mod:`aesr1.aescot.teacher_openai` (any OpenAI-compatible
endpoint). This module is what the distill stage sees of them: the union of their configs
(params ``distill.teacher``) and the teacher of a config's kind.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from aesr1.aescot.teacher_analytic import AnalyticTeacher, AnalyticTeacherConfig
from aesr1.aescot.teacher_openai import OpenAITeacher, OpenAITeacherConfig

# One typed config per teacher kind, told apart by ``kind``; TEACHERS maps each kind to its class.
TeacherConfig = Annotated[AnalyticTeacherConfig | OpenAITeacherConfig, Field(discriminator="kind")]


TEACHERS = {"analytic": AnalyticTeacher, "openai": OpenAITeacher}


def make_teacher(cfg: AnalyticTeacherConfig | OpenAITeacherConfig, max_pixels: int | None):
    """The teacher of the config's kind; it names itself (``teacher_id``) and its instructions (``prompt_id``).

    ``max_pixels`` bounds the images a teacher is shown: the policy's budget. The analytic
    teacher is shown none; it measures the file, as the filter stage's checks do.
    """
    if cfg.kind == "openai":
        return OpenAITeacher(cfg, max_pixels)
    return TEACHERS[cfg.kind](cfg)
