"""The tokenizer of a byte-level BPE model (``tokenizer.json``) as llama.cpp's ``gpt2`` vocabulary.

Written as llama.cpp's converter writes it: ``tokenizer.ggml.model = "gpt2"``, ``tokens`` (the vocabulary
by id, padded with ``[PAD<i>]`` up to the model's vocabulary size), ``token_type`` (control for special
added tokens, user-defined for other added tokens, unused for padding), ``merges``, the bos / eos / unk /
pad ids, ``add_bos_token`` and the chat template (gguf-py's ``SpecialVocab`` reads the last four from the
tokenizer files).

``tokenizer.ggml.pre`` names the pre-tokenizer llama.cpp runs before BPE. The converter finds it by hashing
the token ids of a test text against a table of known models; here it is read from ``tokenizer.json``'s
``pre_tokenizer`` instead: each entry of ``PRE_TOKENIZERS`` is a llama.cpp pre-tokenizer whose splitting
rules (``llama-vocab.cpp``) are those of the transformers pre-tokenizer it matches, so llama.cpp splits
text exactly as transformers does (and, where a choice exists, cleans up spaces when detokenizing as
transformers does). A pre-tokenizer outside the table is refused. ``add_bos_token`` is
the tokenizer files' own setting; where they do not say and llama.cpp's default for the pre-tokenizer
differs from what the tokenizer does (whether encoding a text starts with BOS), that behaviour.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from moequant.errors import MoequantError

log = logging.getLogger(__name__)

# The splitting regexes of transformers' tokenizers for which llama.cpp has a pre-tokenizer doing the same.
_LLAMA3 = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
           "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2 = _LLAMA3.replace("\\p{N}{1,3}", "\\p{N}")

# What llama.cpp's pre-tokenizers do (llama-vocab.cpp): split rules as ``_signature`` spells them, and
# whether detokenizing cleans up spaces before punctuation (transformers' clean_up_tokenization_spaces).
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "gpt-2": (("bytelevel:regex",), True),  # GPT-2's regex (GPT-2, GPT-NeoX, OLMo)
    "starcoder": (("digits:individual", "bytelevel:regex"), True),  # each digit alone, then GPT-2's regex
    "smollm": (("digits:individual", "bytelevel:regex"), False),
    "llama-bpe": ((f"split:{_LLAMA3}", "bytelevel"), True),  # Llama 3
    "qwen2": ((f"split:{_QWEN2}", "bytelevel"), False),  # Qwen2 / Qwen2.5 / Qwen3
}

# Pre-tokenizers after which llama.cpp adds BOS when the file does not say (llama-vocab.cpp); others do not.
LLAMA_CPP_ADDS_BOS = {"llama-bpe": True}


@dataclass(frozen=True)
class Vocab:
    """tokens / token_types by id, the llama.cpp pre-tokenizer, and the directory ``SpecialVocab`` reads."""

    tokens: list[str]
    token_types: list[int]
    pre: str
    add_bos: bool | None  # what encoding does, used where the tokenizer files do not say
    files: Path


def _signature(pre: Any) -> tuple[str, ...]:
    """A ``tokenizer.json`` pre-tokenizer as a tuple of steps (``"bytelevel:regex"``, ``"split:<regex>"``,
    ``"digits:individual"``, ...); ``("?<type>",)`` for a step outside that vocabulary."""
    if pre is None:
        return ()
    kind = pre.get("type")
    if kind == "Sequence":
        return tuple(s for p in pre.get("pretokenizers", []) for s in _signature(p))
    if kind == "ByteLevel" and not pre.get("add_prefix_space", False):
        return ("bytelevel:regex",) if pre.get("use_regex", True) else ("bytelevel",)
    if kind == "Split" and pre.get("behavior") == "Isolated" and not pre.get("invert", False):
        pattern = pre.get("pattern", {})
        if "Regex" in pattern:
            return (f"split:{pattern['Regex']}",)
    if kind == "Digits":
        return ("digits:individual",) if pre.get("individual_digits") else ("digits",)
    return (f"?{kind}",)


def pre_tokenizer_name(tokenizer_json: dict[str, Any], cleans_spaces: bool, where: str) -> str:
    """The llama.cpp pre-tokenizer that splits and detokenizes as ``tokenizer_json`` does (``cleans_spaces``:
    transformers' clean_up_tokenization_spaces). GPT-2's regex alone equals "each digit alone, then GPT-2's
    regex" when no vocabulary entry but the single digits contains a digit (SmolLM2's tokenizer as stored
    here): that lets a tokenizer that does not clean up spaces map to ``smollm``."""
    sig = _signature(tokenizer_json.get("pre_tokenizer"))
    vocab = (tokenizer_json.get("model") or {}).get("vocab") or {}
    if sig == ("bytelevel:regex",) and not any(len(t) > 1 and any("0" <= c <= "9" for c in t) for t in vocab):
        sig = ("digits:individual", "bytelevel:regex")
    same_split = [name for name, (want, _) in PRE_TOKENIZERS.items() if sig == want]
    for name in same_split:
        if PRE_TOKENIZERS[name][1] == cleans_spaces:
            return name
    if same_split:  # the split matches; llama.cpp will differ in cleaning up spaces when detokenizing
        log.warning("%s: llama.cpp's %r pre-tokenizer %s spaces before punctuation when detokenizing, transformers "
                    "does not", where, same_split[0], "cleans up" if PRE_TOKENIZERS[same_split[0]][1] else "keeps")
        return same_split[0]
    raise MoequantError(f"{where}: pre-tokenizer {list(sig)} has no llama.cpp equivalent known to moequant "
                        f"(known: {', '.join(PRE_TOKENIZERS)})")


def read_vocab(tokenizer: Any, files: Path, n_vocab: int | None) -> Vocab:
    """The ``gpt2`` vocabulary of the transformers ``tokenizer`` whose files are in ``files``. ``n_vocab``:
    pad the token list with unused ``[PAD<i>]`` entries up to this size (the model's vocabulary); None:
    exactly the tokenizer's ids."""
    path = files / "tokenizer.json"
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MoequantError(f"{files}: no tokenizer.json (GGUF export writes byte-level BPE vocabularies "
                            f"from tokenizer.json)") from None
    except (OSError, ValueError) as e:
        raise MoequantError(f"{path}: cannot read ({e})") from None
    model = tj.get("model", {})
    if model.get("type") != "BPE" or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise MoequantError(f"{path}: a {model.get('type')} model with a {(tj.get('decoder') or {}).get('type')} "
                            f"decoder; GGUF export writes byte-level BPE (llama.cpp's gpt2) vocabularies only")
    pre = pre_tokenizer_name(tj, bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)), str(path))
    vocab: dict[str, int] = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    top = max(by_id) + 1
    size = top if n_vocab is None else n_vocab
    if top > size:
        raise MoequantError(f"{files}: the tokenizer has token id {top - 1}, beyond the model's vocabulary of {size}")
    added = tokenizer.get_added_vocab()
    decoders = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        kind = gguf.TokenType.NORMAL
        if tok in added:
            if not decoders[i].normalized:  # llama.cpp expects added tokens in their normalized form
                tok = tokenizer.decode(tokenizer.encode(tok, add_special_tokens=False))
            if decoders[i].special or _looks_special(tok):
                kind = gguf.TokenType.CONTROL
            else:
                kind = gguf.TokenType.USER_DEFINED
                tok = tok.replace("\u2581", " ")
        tokens.append(tok)
        types.append(kind)
    return Vocab(tokens, [int(t) for t in types], pre, _adds_bos(tokenizer), files)


def _looks_special(tok: str) -> bool:
    """Added tokens some models do not flag as special although they are control tokens (the converter's
    list: ``<|...|>``, ``<｜...｜>``, ``<unused...>``, ``<pad>``, ``<mask>``, ``<2mass>``, ``[@BOS@]``)."""
    return (tok in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (tok.startswith("<|") and tok.endswith("|>"))
            or (tok.startswith("<｜") and tok.endswith("｜>")) or (tok.startswith("<unused") and tok.endswith(">")))


def _adds_bos(tokenizer: Any) -> bool | None:
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("moequant")["input_ids"]
    return bool(ids) and ids[0] == bos


def add_vocab(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    """The tokenizer keys, in the converter's order."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    special = gguf.SpecialVocab(vocab.files, load_merges=True, n_vocab=len(vocab.tokens))
    if not special.merges:
        raise MoequantError(f"{vocab.files / 'tokenizer.json'}: no BPE merges")
    if "bos" not in special.add_special_token and vocab.add_bos is not None \
            and vocab.add_bos != LLAMA_CPP_ADDS_BOS.get(vocab.pre, False):
        special.add_special_token["bos"] = vocab.add_bos  # llama.cpp's default for this pre-tokenizer is wrong
    special.add_to_gguf(writer, quiet=True)
