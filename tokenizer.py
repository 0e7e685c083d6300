"""One Tokenizer for every checkpoint: SentencePiece (`tokenizer.model`, LLaMA-1/2, or rebuilt from a GGUF "llama"
vocabulary), byte-level BPE from a GGUF file's `tokenizer.ggml.*` metadata (SmolLM2, built with the `tokenizers`
library) or an HF `tokenizer.json`; plus the prompt formats: the model's chat template (ChatML, LLaMA-2 `[INST]`) and
the Alpaca template for base models.

    from checkpoint import load_tokenizer
    tok = load_tokenizer()                                   # the embedded SmolLM2's BPE and ChatML template
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]))
    tok.decode(ids)

A chat string carries its special tokens as text (`<|im_start|>`, `<s>`); `encode` maps them to their ids, so encode it
with bos=False. Plain prompts take `bos=tok.add_bos` (True for LLaMA's SentencePiece, False for SmolLM2).
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from checkpoint.files import read_json
from checkpoint.gguf_read import read_gguf
from jsonl import write_json

# Stanford Alpaca's two training prompts (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
# tokens that end a turn in the chat formats we know; each one the vocabulary has joins stop_ids
CHAT_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>")
CHAT_TEMPLATES = ("chatml", "llama2")
# llama.cpp's token_type values (gguf.TokenType)
CONTROL, USER_DEFINED = 3, 4


def check_chat_template(name: str | None) -> None:
    if name not in (None, *CHAT_TEMPLATES):
        raise ValueError(f"chat_template={name!r} must be one of {CHAT_TEMPLATES} or None")


def detect_chat_template(template: str | None) -> str | None:
    """Name the chat format a Jinja chat template (GGUF `tokenizer.chat_template`, HF tokenizer_config) writes."""
    if not template:
        return None
    if "<|im_start|>" in template:
        return "chatml"
    if "[INST]" in template:
        return "llama2"
    return None


def default_system_prompt(template: str | None) -> str | None:
    """The system message a ChatML template inserts when the conversation has none (SmolLM2 does)."""
    m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template or "", re.S)
    return m.group(1) if m else None


class Tokenizer:
    """encode/decode over SentencePiece or a `tokenizers.Tokenizer`, with the model's special ids and prompts."""

    def __init__(self, backend, *, bos_id: int | None, eos_id: int | None, pad_id: int | None = None,
                 chat_template: str | None = None, system_prompt: str | None = None, add_bos: bool = False,
                 jinja_template: str | None = None):
        check_chat_template(chat_template)
        self.backend = backend  # sentencepiece.SentencePieceProcessor or tokenizers.Tokenizer
        self._sp = isinstance(backend, spm.SentencePieceProcessor)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.chat_template, self.system_prompt, self.add_bos = chat_template, system_prompt, add_bos
        self.jinja_template = jinja_template  # the source's own template text, written back by save_hf
        self.vocab_size = backend.vocab_size() if self._sp else backend.get_vocab_size(with_added_tokens=True)
        if self._sp:
            # SentencePiece reads "<s>" in text as characters; keep control tokens whole, as HF's LlamaTokenizer does,
            # so the LLaMA-2 chat string encodes to Meta's ids (bos + [INST] ... + eos per turn)
            self._special = {backend.id_to_piece(i): i for i in range(self.vocab_size) if backend.is_control(i)}
            pattern = "|".join(map(re.escape, self._special))
            self._special_re = re.compile(f"({pattern})") if pattern else None
        stops = {self.token_to_id(t) for t in CHAT_END_TOKENS} | {eos_id}
        self.stop_ids: set[int] = {i for i in stops if i is not None}

    # ---- construction
    @classmethod
    def from_sentencepiece(cls, path, chat_template: str | None = None) -> Tokenizer:
        """A SentencePiece `tokenizer.model` (LLaMA-1/2); LLaMA prepends BOS, so add_bos is True."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no SentencePiece model at {path}")
        try:
            sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path}: not a SentencePiece model ({e}); a LLaMA-3 (tiktoken) tokenizer.model is not "
                             "supported: load the HF folder's tokenizer.json instead") from None
        return cls(sp, bos_id=_or_none(sp.bos_id()), eos_id=_or_none(sp.eos_id()), pad_id=_or_none(sp.pad_id()),
                   chat_template=chat_template, add_bos=True)

    @classmethod
    def from_gguf(cls, path) -> Tokenizer:
        """The tokenizer a GGUF file describes: "gpt2" (byte-level BPE) or "llama" (SentencePiece BPE)."""
        meta = read_gguf(path).metadata
        return cls.from_gguf_metadata(meta, source=str(path))

    @classmethod
    def from_gguf_metadata(cls, meta: dict, source: str = "GGUF") -> Tokenizer:
        kind = meta.get("tokenizer.ggml.model")
        needs = {"gpt2": ("tokens", "merges"), "llama": ("tokens", "scores", "token_type")}
        if kind not in needs:
            raise ValueError(f"{source}: tokenizer.ggml.model={kind!r} is not supported ('gpt2' byte-level BPE or "
                             "'llama' SentencePiece); load the model's own tokenizer.model or tokenizer.json instead")
        for key in needs[kind]:
            if f"tokenizer.ggml.{key}" not in meta:
                raise ValueError(f"{source}: metadata key tokenizer.ggml.{key} is missing")
        tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type")
        if kind == "gpt2":
            backend = _byte_level_bpe(tokens, meta["tokenizer.ggml.merges"], types)
        else:
            backend = _sentencepiece_from_vocab(tokens, meta["tokenizer.ggml.scores"], types,
                                                meta.get("tokenizer.ggml.add_space_prefix", True))
        template = meta.get("tokenizer.chat_template")
        # llama.cpp prepends BOS to a SentencePiece vocabulary unless the file says otherwise
        add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
        return cls(backend, bos_id=meta.get("tokenizer.ggml.bos_token_id"),
                   eos_id=meta.get("tokenizer.ggml.eos_token_id"), pad_id=meta.get("tokenizer.ggml.padding_token_id"),
                   chat_template=detect_chat_template(template), system_prompt=default_system_prompt(template),
                   add_bos=bool(add_bos), jinja_template=template)

    @classmethod
    def from_hf(cls, folder) -> Tokenizer:
        """An HF folder's `tokenizer.json` + `tokenizer_config.json` (special tokens, chat template)."""
        folder = Path(folder)
        try:
            backend = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises a bare Exception for a bad file
            raise ValueError(f"{folder / 'tokenizer.json'}: not a tokenizers tokenizer.json ({e})") from None
        cfg_path = folder / "tokenizer_config.json"
        cfg = read_json(cfg_path) if cfg_path.is_file() else {}

        def special(name):
            tok = cfg.get(name)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            return backend.token_to_id(tok) if tok else None

        template = cfg.get("chat_template")
        return cls(backend, bos_id=special("bos_token"), eos_id=special("eos_token"), pad_id=special("pad_token"),
                   chat_template=detect_chat_template(template), system_prompt=default_system_prompt(template),
                   add_bos=bool(cfg.get("add_bos_token", False)), jinja_template=template)

    def save_hf(self, folder) -> None:
        """Write `tokenizer.json` + `tokenizer_config.json` so transformers' AutoTokenizer reads this BPE tokenizer."""
        if self._sp:
            raise ValueError("a SentencePiece tokenizer is saved by copying its tokenizer.model")
        folder = Path(folder)
        self.backend.save(str(folder / "tokenizer.json"))
        name = lambda i: self.backend.id_to_token(i) if i is not None else None  # noqa: E731
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(self.bos_id),
               "eos_token": name(self.eos_id), "pad_token": name(self.pad_id), "add_bos_token": self.add_bos,
               "chat_template": self.jinja_template}
        write_json(folder / "tokenizer_config.json", cfg)

    # ---- ids
    def token_to_id(self, token: str) -> int | None:
        if self._sp:
            i = self.backend.piece_to_id(token)
            return i if self.backend.id_to_piece(i) == token else None  # unknown pieces map to unk
        return self.backend.token_to_id(token)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of text; special tokens written in the text (`<|im_start|>`, `<s>`) become their ids."""
        if self._sp:
            ids = []
            for i, part in enumerate(self._special_re.split(text) if self._special_re else [text]):
                if i % 2:
                    ids.append(self._special[part])
                elif part:
                    ids.extend(self.backend.encode(part))
        else:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        if bos:
            ids = [self._require(self.bos_id, "bos")] + ids
        if eos:
            ids = ids + [self._require(self.eos_id, "eos")]
        return ids

    def decode(self, ids) -> str:
        """Text of ids. SentencePiece drops control tokens (as sentencepiece does); BPE keeps them (as HF does)."""
        ids = [int(i) for i in ids]
        return self.backend.decode(ids) if self._sp else self.backend.decode(ids, skip_special_tokens=False)

    def token_bytes(self) -> list[bytes | None]:
        """The UTF-8 bytes each id stands for (None for special tokens), so a constrained decoder can check a
        candidate token before it is decoded: byte-level BPE spells bytes in GPT-2's alphabet, SentencePiece and
        LLaMA-2's tokenizer.json write a space as U+2581 and a fallback byte as <0xNN>. Built once, then cached."""
        if getattr(self, "_token_bytes", None) is None:
            if self._sp:
                sp = self.backend
                pieces = [None if sp.is_control(i) or sp.is_unknown(i) else sp.id_to_piece(i)
                          for i in range(self.vocab_size)]
                byte_level = False
            else:
                special = {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
                pieces = [None if i in special else self.backend.id_to_token(i) for i in range(self.vocab_size)]
                byte_level = "ByteLevel" in json.dumps(json.loads(self.backend.to_str()).get("decoder"))
            unspell = {c: b for b, c in enumerate(_bytes_to_unicode())}
            fallback = re.compile(r"<0x([0-9A-Fa-f]{2})>")

            def to_bytes(piece: str | None) -> bytes | None:
                if piece is None:
                    return None
                if byte_level:
                    return bytes(unspell[c] for c in piece) if all(c in unspell for c in piece) else piece.encode()
                m = fallback.fullmatch(piece)
                return bytes([int(m[1], 16)]) if m else piece.replace("\u2581", " ").encode()

            self._token_bytes = [to_bytes(p) for p in pieces]
        return self._token_bytes

    def _require(self, i: int | None, what: str) -> int:
        if i is None:
            raise ValueError(f"this tokenizer has no {what} token; call encode with {what}=False")
        return i

    # ---- prompts
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's chat format (messages: [{"role": ..., "content": ...}])."""
        for n, m in enumerate(messages):
            if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{n}]={m!r} needs role system|user|assistant and a string content")
        if self.chat_template == "chatml":
            return self._chatml(messages, add_generation_prompt)
        if self.chat_template == "llama2":
            return self._llama2(messages, add_generation_prompt)
        raise ValueError("this tokenizer has no chat template (a base model): use alpaca_prompt(), "
                         "or load it with chat_template='chatml' or 'llama2'")

    def _chatml(self, messages, add_generation_prompt):
        # SmolLM2's template: a default system turn when the first message is not one, then every turn as
        # <|im_start|>role\ncontent<|im_end|>\n
        out = []
        if self.system_prompt is not None and messages and messages[0]["role"] != "system":
            out.append(f"<|im_start|>system\n{self.system_prompt}<|im_end|>\n")
        out += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
        if add_generation_prompt:
            out.append("<|im_start|>assistant\n")
        return "".join(out)

    def _llama2(self, messages, add_generation_prompt):
        # Meta's chat_completion (llama/generation.py): the system text is folded into the first user turn; each
        # (user, assistant) pair is "<s>[INST] user [/INST] answer </s>", the open turn "<s>[INST] user [/INST]"
        if messages and messages[0]["role"] == "system":
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise ValueError("a llama2 system message must be followed by a user message")
            first = f"<<SYS>>\n{messages[0]['content']}\n<</SYS>>\n\n{messages[1]['content']}"
            messages = [{"role": "user", "content": first}] + messages[2:]
        roles = [m["role"] for m in messages]
        if roles[::2] != ["user"] * len(roles[::2]) or roles[1::2] != ["assistant"] * len(roles[1::2]):
            raise ValueError(f"llama2 chat needs alternating user/assistant turns, got roles {roles}")
        out = []
        for user, answer in zip(messages[::2], messages[1::2]):
            out.append(f"<s>[INST] {user['content'].strip()} [/INST] {answer['content'].strip()} </s>")
        if len(messages) % 2:
            out.append(f"<s>[INST] {messages[-1]['content'].strip()} [/INST]")
        elif add_generation_prompt:
            raise ValueError("llama2 chat: the last message must be the user's to generate a reply")
        return "".join(out)

    def alpaca_prompt(self, instruction: str, input: str = "") -> str:  # noqa: A002 (Alpaca's field name)
        """Stanford Alpaca's prompt (with or without an input); the response follows it."""
        if input:
            return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
        return ALPACA_NO_INPUT.format(instruction=instruction)


def _or_none(i: int) -> int | None:
    return None if i < 0 else i  # sentencepiece reports an absent special token as -1


def _byte_level_bpe(tokens: list[str], merges: list[str], token_types: list[int] | None):
    """GPT-2 style byte-level BPE, built the way transformers builds a GGUF "gpt2" tokenizer (integrations/gguf):
    the GPT-2 split regex + byte-to-unicode alphabet, no prefix space, and control tokens kept whole."""
    spell = _bytes_to_unicode()
    alphabet = set(spell)
    # a token spelled outside the byte alphabet (rare llama.cpp spellings) is re-spelled byte by byte
    vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode()): i for i, t in enumerate(tokens)}
    bpe = HFTokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None,
                                 continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    types = token_types or [1] * len(tokens)
    # control tokens (<|im_start|>) stay whole and special; a control token outside the byte alphabet is a llama.cpp
    # mislabel that transformers skips too
    bpe.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types)
                            if k == CONTROL and set(t) <= alphabet])
    bpe.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types)
                    if k == USER_DEFINED and t in vocab])
    return bpe


def _sentencepiece_from_vocab(tokens: list[str], scores: list[float], types: list[int],
                              add_dummy_prefix: bool) -> spm.SentencePieceProcessor:
    """Rebuild the SentencePiece BPE model a GGUF "llama" vocabulary came from, as the protobuf sentencepiece reads
    (sentencepiece_model.proto: pieces = 1 {piece 1, score 2, type 3}, trainer_spec = 2 {model_type 3, vocab_size 4,
    byte_fallback 35}, normalizer_spec = 3 {name 1, add_dummy_prefix 3, remove_extra_whitespaces 4}). llama.cpp's
    token types are sentencepiece's piece types; LLaMA's tokenizer.model normalizes nothing and keeps all spaces."""
    def varint(n: int) -> bytes:
        n &= (1 << 64) - 1  # negative int32 values are ten-byte two's complement varints
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    def num(field: int, n: int) -> bytes:
        return varint(field << 3) + varint(n)

    def blob(field: int, b: bytes) -> bytes:
        return varint(field << 3 | 2) + varint(len(b)) + b

    pieces = b"".join(blob(1, blob(1, t.encode()) + varint(2 << 3 | 5) + struct.pack("<f", s) + num(3, k))
                      for t, s, k in zip(tokens, scores, types))
    trainer = num(3, 2) + num(4, len(tokens)) + num(35, int(6 in types))  # BPE; byte fallback if <0xNN> pieces
    normalizer = blob(1, b"identity") + num(3, int(add_dummy_prefix)) + num(4, 0)
    return spm.SentencePieceProcessor(model_proto=pieces + blob(2, trainer) + blob(3, normalizer))


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable spelling of the 256 byte values (openai/gpt-2 encoder.py bytes_to_unicode)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]

