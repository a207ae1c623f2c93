"""A teacher whose weights are not in this process's torch: the surface shared by the teacher server
(common/teacher_server.py) and the colocated vLLM engine (common/vllm_teacher.py), below both."""

import torch

PROBE_TEXT = "Ann has 12 apples. She buys 7 more. How many apples does Ann have now? \\boxed{19}"
TEMPERATURE_ATOL = 1e-4  # log-probs at temperature 1 and T closer than this everywhere: the server ignores T


class MetaTeacher:
    """A teacher whose weights are not in this process's torch (a server's, a vLLM engine's): the model-like surface
    check_compatible / count_params read, from its model on the meta device `self.meta` (shapes and stop ids), and
    `row_logprobs(rows, temperature)`, per row of token ids log pi_T(x_i | x_<i) for i = 1..n-1 (`server_forward`)."""
    meta: torch.nn.Module

    @property
    def config(self):
        return self.meta.config

    @property
    def generation_config(self):
        return self.meta.generation_config

    def get_output_embeddings(self):
        return self.meta.get_output_embeddings()

    def parameters(self):
        return self.meta.parameters()

    def row_logprobs(self, rows: list[list[int]], temperature: float) -> list[list[float]]:
        raise NotImplementedError
