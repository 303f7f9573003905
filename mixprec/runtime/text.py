"""Text in and out: the checkpoint's tokenizer.json, its chat template and stop tokens."""
from __future__ import annotations

import json
from pathlib import Path


# generation_config.json keys that are sampling defaults (SamplingParams' names), as vLLM reads them
SAMPLING_DEFAULTS = ("temperature", "top_k", "top_p", "presence_penalty", "frequency_penalty")


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's characters -> bytes (GPT-2's bytes_to_unicode, inverted): printable bytes
    stand for themselves, the others for 256 + n."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars = {b: b for b in keep}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b], n = 256 + n, n + 1
    return {chr(c): b for b, c in chars.items()}


BYTE_DECODER = _byte_decoder()


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what generation needs from tokenizer_config.json /
    generation_config.json: the chat template, the eos token ids and the checkpoint's sampling
    defaults (`generation_defaults`, e.g. Qwen3's temperature 0.6, top_k 20, top_p 0.95)."""

    def __init__(self, tok, chat_template: str | None, eos_token_ids: list[int],
                 generation_defaults: dict | None = None):
        self.tok = tok
        self.chat_template = chat_template
        self.eos_token_ids = eos_token_ids
        self.generation_defaults = dict(generation_defaults or {})

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer | None":
        from tokenizers import Tokenizer as HFTokenizer
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            return None
        tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        tcfg = _read_json(path / "tokenizer_config.json")
        gcfg = _read_json(path / "generation_config.json")
        mcfg = _read_json(path / "config.json")
        eos: list[int] = []
        for src in (gcfg.get("eos_token_id"), mcfg.get("eos_token_id")):
            for i in (src if isinstance(src, list) else [src]):
                if isinstance(i, int) and i not in eos:
                    eos.append(i)
        eos_tok = tcfg.get("eos_token")
        eos_tok = eos_tok.get("content") if isinstance(eos_tok, dict) else eos_tok
        if isinstance(eos_tok, str) and tok.token_to_id(eos_tok) is not None and tok.token_to_id(eos_tok) not in eos:
            eos.append(tok.token_to_id(eos_tok))
        defaults = {k: gcfg[k] for k in SAMPLING_DEFAULTS if gcfg.get(k) is not None}
        return cls(tok, tcfg.get("chat_template"), eos, defaults)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, i: int) -> bytes:
        """Token i's own bytes (a byte-level BPE token may hold part of a UTF-8 character), as
        OpenAI's logprobs report them; other tokenizers: its decoded text."""
        t = self.tok.id_to_token(i)
        if t is None:
            return b""
        if all(c in BYTE_DECODER for c in t):
            return bytes(BYTE_DECODER[c] for c in t)
        return self.tok.decode([i], skip_special_tokens=False).encode()

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The checkpoint's chat template rendered as transformers renders it; kwargs are the
        template's own variables (Qwen3: enable_thinking=False for its non-thinking mode), and the
        ones not given stay undefined, so the template's defaults hold (Qwen3: thinking on)."""
        if not self.chat_template:
            raise ValueError("this checkpoint has no chat_template in tokenizer_config.json")
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ImportError("chat templates need jinja2: pip install 'mixprec[serve]' or pip install jinja2") from None
        # the template is data from the checkpoint: render it sandboxed, as transformers does
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda v, **kw: json.dumps(v, ensure_ascii=False, **kw)

        def raise_exception(msg):
            raise ValueError(msg)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            **{"tools": None, "bos_token": "", "eos_token": "", **kwargs,
               "messages": messages, "add_generation_prompt": add_generation_prompt})

    def encode_prompt(self, prompt: str, chat: bool = False, **template_kwargs) -> list[int]:
        if chat:
            prompt = self.apply_chat_template([{"role": "user", "content": prompt}], **template_kwargs)
        return self.encode(prompt)


def _read_json(p: Path) -> dict:
    return json.loads(p.read_text()) if p.exists() else {}
