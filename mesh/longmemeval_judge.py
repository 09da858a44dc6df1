"""LongMemEval's QA judge: the paper's prompt per question type, answered yes/no by an LLM.

The templates are LongMemEval's own (``src/evaluation/evaluate_qa.py``, ``get_anscheck_prompt``, MIT licence,
(c) 2024 Di Wu), kept word for word so that accuracies are comparable with the paper's; the decision rule is
theirs too: the answer is correct when the judge's reply contains "yes". Abstention questions (``_abs`` in the
id) use the abstention template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_ASK = ("\n\nQuestion: {}\n\nCorrect Answer: {}\n\nModel Response: {}\n\n"
        "Is the model response correct? Answer yes or no only.")
_BASE = ("I will give you a question, a correct answer, and a response from a model. Please answer yes if the "
         "response contains the correct answer. Otherwise, answer no. If the response is equivalent to the correct "
         "answer or contains all the intermediate steps to get the correct answer, you should also answer yes. If "
         "the response only contains a subset of the information required by the answer, answer no. ")
TEMPLATES: dict[str, str] = {
    "default": _BASE + _ASK,
    "temporal-reasoning": _BASE + (
        "In addition, do not penalize off-by-one errors for the number of days. If the question asks for the number "
        "of days/weeks/months, etc., and the model makes off-by-one errors (e.g., predicting 19 days when the answer "
        "is 18), the model's response is still correct. ") + _ASK,
    "knowledge-update": (
        "I will give you a question, a correct answer, and a response from a model. Please answer yes if the "
        "response contains the correct answer. Otherwise, answer no. If the response contains some previous "
        "information along with an updated answer, the response should be considered as correct as long as the "
        "updated answer is the required answer.") + _ASK,
    "single-session-preference": (
        "I will give you a question, a rubric for desired personalized response, and a response from a model. Please "
        "answer yes if the response satisfies the desired response. Otherwise, answer no. The model does not need to "
        "reflect all the points in the rubric. The response is correct as long as it recalls and utilizes the user's "
        "personal information correctly.\n\nQuestion: {}\n\nRubric: {}\n\nModel Response: {}\n\nIs the model "
        "response correct? Answer yes or no only."),
    "abstention": (
        "I will give you an unanswerable question, an explanation, and a response from a model. Please answer yes if "
        "the model correctly identifies the question as unanswerable. The model could say that the information is "
        "incomplete, or some other information is given but the asked information is not.\n\nQuestion: {}\n\n"
        "Explanation: {}\n\nModel Response: {}\n\nDoes the model correctly identify the question as unanswerable? "
        "Answer yes or no only."),
}
DEFAULT_TYPES = ("single-session-user", "single-session-assistant", "multi-session")


def anscheck_prompt(question_type: str, question: str, answer: str, response: str, *, abstention: bool) -> str:
    if abstention:
        key = "abstention"
    elif question_type in DEFAULT_TYPES:
        key = "default"
    elif question_type in TEMPLATES:
        key = question_type
    else:
        raise ValueError(f"no judge prompt for question type {question_type!r}")
    return TEMPLATES[key].format(question, answer, response)


@dataclass(slots=True)
class Verdict:
    correct: bool
    raw: str
    error: str | None = None


class Judge:
    """Grades answers with ``model`` (an OpenAI-compatible model, shared/runtime/llm.py)."""

    def __init__(self, api_key: str | None, base_url: str | None, model: str, timeout_s: float = 60.0) -> None:
        from shared.runtime.llm import chat_model

        llm = chat_model(api_key or "not-needed", base_url, model, timeout_s)
        assert llm is not None
        self.llm: Any = llm
        self.model = model

    async def grade(self, question_id: str, question_type: str, question: str, answer: str,
                    response: str) -> Verdict:
        prompt = anscheck_prompt(question_type, question, answer, response, abstention="_abs" in question_id)
        try:
            raw = await self.llm.complete([{"role": "user", "content": prompt}], max_tokens=10, temperature=0.0)
        except Exception as exc:  # noqa: BLE001 - a failed grading is reported, it does not stop the run
            return Verdict(False, "", f"{type(exc).__name__}: {exc}")
        return Verdict("yes" in raw.lower(), raw)

    async def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close is not None:
            await close()
