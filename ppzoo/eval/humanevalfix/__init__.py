"""HumanEvalFix: prompts, generation, sandboxed execution of the candidates and pass@k per bug type."""
from ppzoo.eval.humanevalfix.harness import (
    DATA_FILE,
    build_program,
    build_prompt,
    generate_bodies,
    load_problems,
    markdown_table,
    pass_at_k,
    run_candidates,
    score,
)
from ppzoo.eval.humanevalfix.sandbox import RunResult, Sandbox, SandboxLimits, SandboxUnavailable

__all__ = ["DATA_FILE", "RunResult", "Sandbox", "SandboxLimits", "SandboxUnavailable", "build_program",
           "build_prompt", "generate_bodies", "load_problems", "markdown_table", "pass_at_k", "run_candidates",
           "score"]
