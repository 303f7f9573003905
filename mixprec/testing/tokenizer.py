"""A tiny Qwen-style byte-level BPE tokenizer, trained offline on an embedded text.

Same pipeline as Qwen2/Qwen3 (NFC normalizer, Qwen's split regex, byte-level, no unk), so
transformers' `PreTrainedTokenizerFast` and `Qwen2Tokenizer` both read it. The special tokens
sit at the top of the vocabulary, as in Qwen's releases: with `vocab_size` V,
`<|endoftext|>` = V-3, `<|im_start|>` = V-2, `<|im_end|>` = V-1. Beyond about 960 entries
(where the embedded text runs out of merges) the gap is filled with unused `<|extra_i|>` tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Qwen2/Qwen3 pre-tokenizer regex (tokenizer.json of the releases).
QWEN_SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Reduced Qwen3 template: system / user / assistant / tool turns, tools block, thinking switch.
# Past assistant turns lose their <think> part, as in Qwen3's template.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set content = message.content %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>assistant\\n' + content }}"
    "{%- if message.tool_calls %}{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}"
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Training text: plain English prose; fixed, so the merges (and every token id) are reproducible.
TRAINING_TEXT = """\
The morning train left the station a few minutes after six. Most of the passengers were still
half asleep, holding paper cups of coffee and watching the grey fields slide past the windows.
A small child in the third row asked her father why the trees seemed to run backwards, and he
tried to explain that it was the train that moved, not the trees. She did not believe him.

In the kitchen of the old house, the bread was rising under a clean cloth. The recipe had been
written by hand on a card that was now yellow and soft at the corners: four cups of flour, one
spoon of salt, a little sugar, warm water and yeast. Knead it for ten minutes, let it rest for an
hour, shape the loaf, and bake it until the crust sounds hollow when you knock on it.

Scientists measure the speed of light with great care, because so many other numbers depend on
it. Light travels about three hundred thousand kilometres every second, which means that the
light we see from the sun left it roughly eight minutes ago. When we look at distant stars, we
are looking into the past, seeing them as they were many years before we were born.

The library opened at nine o'clock. Students came in with their laptops and their notes, looking
for a quiet table near a window. The librarian, who had worked there for thirty years, knew where
every book was kept, and she could usually guess what a student needed before they asked.

"Are you sure this is the right road?" she asked. "I'm sure," he said, although he wasn't. They
had been driving for two hours, the map was somewhere under the seat, and the small town they
were looking for did not seem to exist. Still, the evening was warm, the radio was playing an old
song they both liked, and neither of them was in a hurry to arrive.

A good program is easy to read. Each function does one thing, its name says what that thing is,
and its inputs and outputs are clear. Tests check that it works, and they fail loudly when it
does not. When something goes wrong, the error message tells you which file, which line, and
what value was expected, so that you can fix it quickly and move on to the next problem.

Rivers carry water from the mountains to the sea. Along the way they cut valleys, feed forests and
farms, and give cities a reason to grow on their banks. In spring, when the snow melts, the water
rises; in late summer it falls again, and the stones of the riverbed dry in the sun.
Numbers like 1, 2, 3, 10, 42, 100 and 2025 appear in text too, as do symbols: (a + b) * c = d;
x[0] -> y[1]; {"key": "value"}; 50% off! Is it true? Yes... no -- maybe.
"""


def special_token_ids(vocab_size: int) -> dict[str, int]:
    """Token -> id of the special tokens for a tokenizer built with `vocab_size`."""
    return {tok: vocab_size - len(SPECIAL_TOKENS) + i for i, tok in enumerate(SPECIAL_TOKENS)}


def train_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """Deterministic byte-level BPE with `vocab_size` entries, the specials last."""
    n_special = len(SPECIAL_TOKENS)
    if vocab_size < 256 + n_special:
        raise ValueError(f"vocab_size {vocab_size} < {256 + n_special} (256 byte tokens + {n_special} specials)")
    tok = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                        fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = BpeTrainer(vocab_size=vocab_size - n_special, min_frequency=1, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator([TRAINING_TEXT], trainer=trainer)
    # The text runs out of merges near 960 tokens; larger vocabularies get unused reserved
    # tokens (as Qwen's padded vocabularies have) so the specials still sit at the top.
    n_extra = vocab_size - n_special - tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(f"<|extra_{i}|>", special=True, normalized=False) for i in range(n_extra)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    got = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    if got != special_token_ids(vocab_size):
        raise ValueError(f"special token ids {got}, expected {special_token_ids(vocab_size)}")
    return tok


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512) -> dict[str, int]:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json (Qwen3 style)
    into out_dir. Returns the special token ids."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(vocab_size)
    tok.save(str(out / "tokenizer.json"))
    ids = special_token_ids(vocab_size)
    added = {str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}
             for i, t in sorted(tok.get_added_tokens_decoder().items())}
    tok_cfg = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    gen_cfg = {
        "bos_token_id": ids["<|endoftext|>"],
        "do_sample": True,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.95,
    }
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    return ids
