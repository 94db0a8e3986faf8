"""WordPiece tokenizer: train an uncased one, load any tokenizer.json / vocab.txt, hash it, find special ids.

The project's tokenizer is the BERT uncased recipe (lowercase, strip accents, split on whitespace and
punctuation, WordPiece with ``##`` continuations) with the special tokens [PAD] [UNK] [CLS] [SEP] [MASK].
A directory written by :func:`save_tokenizer` holds ``tokenizer.json`` (the full pipeline), ``vocab.txt``
(for WordPiece models) and a small ``tokenizer_config.json``, so Hugging Face ``AutoTokenizer`` loads it too.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from electra_ds.files import atomic_write

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_SPECIAL_KEYS = dict(zip(("pad", "unk", "cls", "sep", "mask"), SPECIAL_TOKENS))


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable, or lacks a token the project needs."""


def _bert_uncased(vocab: dict[str, int] | None = None) -> Tokenizer:
    """The uncased BERT pipeline around a WordPiece model (untrained when ``vocab`` is None)."""
    model = models.WordPiece(vocab, unk_token="[UNK]") if vocab is not None else models.WordPiece(unk_token="[UNK]")
    tok = Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _add_post_processor(tok: Tokenizer) -> None:
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])


def train_tokenizer(texts: Iterable[str], vocab_size: int, output_dir: str | os.PathLike,
                    *, min_frequency: int = 2, limit_alphabet: int = 1000,
                    show_progress: bool = False) -> Path:
    """Train an uncased WordPiece tokenizer on ``texts`` and save it to ``output_dir`` (returned).

    Special tokens get ids 0-4 in the order [PAD] [UNK] [CLS] [SEP] [MASK].
    """
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise TokenizerError(f"vocab_size={vocab_size} is too small (needs the 5 special tokens and more)")
    tok = _bert_uncased()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(SPECIAL_TOKENS), limit_alphabet=limit_alphabet,
                                        continuing_subword_prefix="##", show_progress=show_progress)
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() <= len(SPECIAL_TOKENS):
        raise TokenizerError("tokenizer training saw no text: the source is empty")
    _add_post_processor(tok)
    return save_tokenizer(tok, output_dir)


def save_tokenizer(tok: Tokenizer, output_dir: str | os.PathLike) -> Path:
    """Write tokenizer.json (+ vocab.txt and tokenizer_config.json for WordPiece) into ``output_dir``.

    Every file is written to a temporary name and renamed into place.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"tokenizer.json": tok.to_str(pretty=True)}
    vocab = tok.get_vocab(with_added_tokens=True)
    if isinstance(tok.model, models.WordPiece):
        files["vocab.txt"] = "".join(t + "\n" for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]))
    normalizer = json.loads(tok.to_str()).get("normalizer")
    config = {"tokenizer_class": "ElectraTokenizer", "do_lower_case": _lowercases(normalizer),
              "model_max_length": 512}
    config.update({f"{key}_token": t for key, t in _SPECIAL_KEYS.items() if t in vocab})
    files["tokenizer_config.json"] = json.dumps(config, indent=2) + "\n"
    for name, text in files.items():
        atomic_write(out / name, text)
    return out


def _lowercases(normalizer: dict | None) -> bool:
    """Whether a serialized normalizer lowercases its input."""
    if not normalizer:
        return False
    kind = normalizer.get("type")
    if kind == "Sequence":
        return any(_lowercases(n) for n in normalizer.get("normalizers", []))
    return kind == "Lowercase" or (kind == "BertNormalizer" and bool(normalizer.get("lowercase")))


def _vocab_from_txt(path: Path) -> dict[str, int]:
    r"""Token -> id (its line number - 1). Lines end at "\n" only (a trailing "\r" is dropped), as Hugging Face's
    loaders read them: str.splitlines would also split at \x0b, \x0c, \x85, \u2028 ... inside tokens and shift
    every later id."""
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot read vocabulary {path}: {e}") from None
    if lines[-1] == "":  # after the final newline
        lines.pop()
    vocab: dict[str, int] = {}
    for line_no, token in enumerate(lines, 1):
        token = token.removesuffix("\r")
        if token in vocab:
            raise TokenizerError(f"{path}:{line_no}: token {token!r} appears twice")
        vocab[token] = len(vocab)
    if not vocab:
        raise TokenizerError(f"vocabulary {path} is empty")
    return vocab


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a directory (tokenizer.json, else vocab.txt), a tokenizer.json or a vocab.txt.

    A bare vocab.txt becomes an uncased BERT WordPiece tokenizer. Padding and truncation are switched off
    so that encodings keep their full length.
    """
    p = Path(path)
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            p = p / "tokenizer.json"
        elif (p / "vocab.txt").is_file():
            p = p / "vocab.txt"
        else:
            raise TokenizerError(f"no tokenizer.json or vocab.txt in {p}")
    if not p.is_file():
        raise TokenizerError(f"tokenizer not found: {p} (give a directory with tokenizer.json or vocab.txt)")
    if p.suffix == ".txt":
        tok = _bert_uncased(_vocab_from_txt(p))
        special_ids(tok)  # a vocab.txt without the BERT special tokens cannot be used
        _add_post_processor(tok)
    else:
        try:
            tok = Tokenizer.from_file(str(p))
        except Exception as e:  # the Rust side raises plain Exception with a parse message
            raise TokenizerError(f"cannot load tokenizer {p}: {e}") from None
    tok.no_padding()
    tok.no_truncation()
    return tok


def text_tokenizer(tok: Tokenizer | str) -> Tokenizer:
    """A copy of `tok` (or of its JSON) for raw text: no padding or truncation, and "[SEP]", "[MASK]", ... written
    in the text read as words, as BERT's vocab.txt tokenizer reads them; only our code inserts special tokens."""
    copy = Tokenizer.from_str(tok if isinstance(tok, str) else tok.to_str())
    copy.no_truncation()
    copy.no_padding()
    copy.encode_special_tokens = True  # to_str() does not keep it
    return copy


def tokenizer_hash(tok: Tokenizer) -> str:
    """A short stable hash of everything that decides token ids (padding/truncation settings excluded)."""
    spec = json.loads(tok.to_str())
    spec.pop("padding", None)
    spec.pop("truncation", None)
    blob = json.dumps(spec, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def vocab_size(tok: Tokenizer) -> int:
    """Size of the id space: the largest id of the model vocabulary and added tokens, plus one (the token count,
    unless a tokenizer.json leaves gaps between ids)."""
    return max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """Ids of the special tokens, keys pad, unk, cls, sep, mask."""
    ids = {key: tok.token_to_id(token) for key, token in _SPECIAL_KEYS.items()}
    missing = [_SPECIAL_KEYS[k] for k, v in ids.items() if v is None]
    if missing:
        raise TokenizerError(f"tokenizer lacks the special token(s) {', '.join(missing)}; "
                             "ELECTRA needs [PAD] [UNK] [CLS] [SEP] [MASK]")
    return ids
