"""New tokens with trainable embeddings, shared by Textual Inversion and Custom Diffusion.

The tokens are added to the tokenizer and the text encoder's embedding matrix grows by their rows,
but the matrix itself stays frozen: the new rows are a separate [N, D] parameter that a forward hook
on the embedding layer puts in place of the looked-up rows. So the optimizer (weight decay included)
can move nothing but the new rows, and the trainable-parameter count is exactly N x D.
`write_rows()` copies the trained vectors into the matrix, for an in-memory pipeline.
Multi-vector names follow diffusers' load_textual_inversion: "<tok>", "<tok>_1", ..., "<tok>_{N-1}".
"""

from __future__ import annotations

import torch

from ..train.method import MethodError


def vector_names(token: str, n: int) -> list[str]:
    """The tokenizer entries of an n-vector placeholder, as load_textual_inversion names them."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def expand(prompt: str, token: str, n: int) -> str:
    """The prompt with the placeholder spelled as its n tokens (what pipe.maybe_convert_prompt does)."""
    return prompt.replace(token, " ".join(vector_names(token, n)))


def initializer_vector(tokenizer, embedding: torch.Tensor, word: str, owner: str) -> torch.Tensor:
    """The embedding of `word`; a word that splits into several tokens gets the mean of their rows."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if not ids:
        raise MethodError(f"{owner}: initializer_token {word!r} encodes to no token")
    return embedding[ids].float().mean(0)


class TrainableTokens:
    """Adds `tokens` (each initialised from its word in `initializers`) and trains their rows only."""

    def __init__(self, tokenizer, text_encoder, tokens: list[str], initializers: list[str], owner: str):
        if any(t != t.lower() for t in tokens):
            raise MethodError(f"{owner}: placeholder tokens must be lower-case (the CLIP tokenizer lower-cases "
                              f"prompts): {tokens}")
        clash = [t for t in tokens if len(tokenizer.encode(t, add_special_tokens=False)) == 1]  # a known word
        if clash or tokenizer.add_tokens(tokens) != len(tokens):
            raise MethodError(f"{owner}: tokens {clash or tokens} already exist in the tokenizer; pick new names")
        weight = text_encoder.get_input_embeddings().weight
        init = torch.stack([initializer_vector(tokenizer, weight.detach(), w, owner) for w in initializers])
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        self.embedding = text_encoder.get_input_embeddings()
        self.ids = tokenizer.convert_tokens_to_ids(tokens)
        self.first = self.ids[0]
        if self.ids != list(range(self.first, self.first + len(tokens))):
            raise MethodError(f"{owner}: new token ids {self.ids} are not contiguous")
        self.tokens = list(tokens)
        self.vectors = torch.nn.Parameter(init.to(self.embedding.weight.device))
        self.write_rows()
        self.embedding.register_forward_hook(self._replace)

    def _replace(self, module, inputs, output):
        # No early return when no new token is present: testing for one would sync with the GPU.
        ids = inputs[0]
        new = ids >= self.first
        rows = self.vectors[(ids - self.first).clamp(0, len(self.ids) - 1)].to(output.dtype)
        return torch.where(new.unsqueeze(-1), rows, output)

    def to(self, device) -> "TrainableTokens":
        with torch.no_grad():
            self.vectors.data = self.vectors.data.to(device)
        return self

    @torch.no_grad()
    def write_rows(self) -> None:
        """Copy the vectors into the embedding matrix (what a saved-then-loaded pipeline will hold)."""
        w = self.embedding.weight
        w[self.first : self.first + len(self.ids)] = self.vectors.detach().to(w.device, w.dtype)

    def by_token(self) -> dict[str, torch.Tensor]:
        return {t: self.vectors.detach()[i].cpu().contiguous() for i, t in enumerate(self.tokens)}
