"""Chat prompts for the math and code tasks.

The model's chat template (applied by verl's agent loop at rollout time, and by evaluate.py) turns
these messages into tokens; the parquet files store messages, never rendered text.
"""

from __future__ import annotations

# Qwen2.5-Math's own chain-of-thought system prompt (its model card / chat template default); the
# math grader reads the last \boxed{} of the response.
MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
MATH_USER_SUFFIX = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."

CODE_SYSTEM = (
    "You are an expert Python programmer. Think about the problem, then give your complete solution "
    "in a single ```python code block at the end of your answer."
)
CODE_STDIN_INSTRUCTION = (
    "\n\nYour program must read the input from standard input and write the answer to standard output."
)

MATH_PROMPT_STYLES = ("qwen-math", "user-suffix")


def math_messages(problem: str, style: str = "qwen-math") -> list[dict[str, str]]:
    """`qwen-math`: the instruction as system prompt (Qwen2.5-Math's format); `user-suffix`: appended
    to the user turn, for chat templates without a system role."""
    if style == "qwen-math":
        return [{"role": "system", "content": MATH_SYSTEM}, {"role": "user", "content": problem}]
    if style == "user-suffix":
        return [{"role": "user", "content": problem + MATH_USER_SUFFIX}]
    raise ValueError(f"unknown math prompt style {style!r}; choose one of {MATH_PROMPT_STYLES}")


def code_messages(task: str) -> list[dict[str, str]]:
    """`task` is the full problem statement, including any stdin/stdout or function-signature
    instruction (see code_sets.py, which knows which kind of problem it is)."""
    return [{"role": "system", "content": CODE_SYSTEM}, {"role": "user", "content": task}]


def function_task(signature_and_docstring: str) -> str:
    """HumanEval-style task: complete a function given its signature and docstring."""
    return (
        "Complete the following Python function. Give the whole function (with its imports) in your "
        f"answer.\n\n```python\n{signature_and_docstring.rstrip()}\n```"
    )


def asserts_task(description: str, example_tests: list[str]) -> str:
    """MBPP-style task: a one-line description plus the tests the function must pass."""
    tests = "\n".join(example_tests)
    return f"{description.strip()}\nYour code should pass these tests:\n\n```python\n{tests}\n```"
