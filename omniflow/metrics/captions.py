"""Caption metrics of COCO's evaluation: CIDEr-D, BLEU-1..4 and ROUGE-L, by pycocoevalcap's scorers.

METEOR and SPICE are left out: pycocoevalcap runs both as Java programs. Its PTBTokenizer is Java
too (Stanford CoreNLP), so captions are tokenised by `tokenize_caption`, a pure-Python stand-in that
does what PTB tokenisation followed by COCO's punctuation removal does to plain English captions.

Corpus-level CIDEr depends on the evaluated set, as in COCO's evaluation: its IDF weights come from
the references of the call, so an n-gram found in every sample's references weighs nothing, and a
single sample always scores 0. Compare CIDEr only between runs on the same reference set.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

# A number with inner separators ("3.5", "1,000"), a word with inner hyphens or apostrophes
# ("black-and-white", "o'clock", "man's"), or any other single character.
_TOKEN = re.compile(r"\d+(?:[.,]\d+)+|[^\W_]+(?:['-][^\W_]+)*|\S")
# PTB splits these clitics off as tokens of their own: "man's" -> "man 's", "don't" -> "do n't".
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
# What COCO removes after PTB: . , ? ! : ; dashes, quotes and brackets (PTB's -LRB- and kin).
_DROPPED = set(".,?!:;-'\"`()[]{}") | {"\u2013", "\u2014"}
_NORMALISED = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})


def tokenize_caption(caption: str) -> str:
    """Lower-case, split into PTB-style tokens, drop punctuation, join with single spaces.

    A stand-in for pycocoevalcap's PTBTokenizer (which runs Stanford CoreNLP in Java) on plain
    English: clitics become tokens ("'s", "n't"), numbers and hyphenated words stay whole, other
    symbols ($, %, &, /) stay as tokens of their own.

    Example:
        >>> tokenize_caption("A man's dog, running (fast)... Don't stop!")
        "a man 's dog running fast do n't stop"
    """
    tokens = []
    for token in _TOKEN.findall(caption.lower().translate(_NORMALISED)):
        if token in _DROPPED:
            continue
        clitic = _CLITIC.match(token)
        tokens.extend(clitic.groups() if clitic else (token,))
    return " ".join(tokens)


@dataclass(frozen=True)
class CaptionScores:
    """Corpus-level scores and each sample's.

    BLEU's corpus value pools n-gram counts over the corpus, so it is not the mean of the samples'
    values; CIDEr's and ROUGE-L's are.
    """

    cider: float
    bleu: tuple[float, float, float, float]  # BLEU-1..4
    rouge_l: float
    cider_per_sample: np.ndarray  # (N,)
    bleu_per_sample: np.ndarray  # (N, 4): BLEU-1..4 of each candidate
    rouge_l_per_sample: np.ndarray  # (N,)

    def summary(self) -> dict[str, float]:
        """The corpus-level values by their usual names, for a report or a manifest."""
        return {
            "CIDEr": self.cider,
            **{f"BLEU-{n}": value for n, value in enumerate(self.bleu, start=1)},
            "ROUGE-L": self.rouge_l,
        }


def caption_metrics(
    candidates: Sequence[str], references: Sequence[Sequence[str]]
) -> CaptionScores:
    """Score each candidate caption against its references (one or more per candidate).

    Example:
        >>> scores = caption_metrics(
        ...     ["a red circle", "a green square"],
        ...     [["a red circle"], ["a blue square", "a small blue square"]],
        ... )
        >>> [round(r, 4) for r in scores.rouge_l_per_sample.tolist()], round(scores.bleu[0], 4)
        ([1.0, 0.6667], 0.8333)
    """
    if len(candidates) != len(references):
        raise ValueError(
            f"got {len(candidates)} candidates and {len(references)} reference lists; "
            "give one list of references per candidate"
        )
    if not candidates:
        raise ValueError("no captions to score")
    res, gts = {}, {}
    for i, (candidate, refs) in enumerate(zip(candidates, references, strict=True)):
        if isinstance(refs, str):
            raise TypeError(f"references[{i}] is a string; give a list of reference captions")
        tokenized = [tokenize_caption(ref) for ref in refs]
        if not any(tokenized):
            raise ValueError(f"references[{i}] holds no reference with a word in it: {refs!r}")
        res[i], gts[i] = [tokenize_caption(candidate)], tokenized
    cider, cider_N = Cider().compute_score(gts, res)
    bleu, bleu_4N = Bleu(4).compute_score(gts, res, verbose=0)
    rouge_l, rouge_l_N = Rouge().compute_score(gts, res)
    return CaptionScores(
        cider=float(cider),
        bleu=tuple(float(b) for b in bleu),
        rouge_l=float(rouge_l),
        cider_per_sample=np.asarray(cider_N, dtype=np.float64),
        bleu_per_sample=np.asarray(bleu_4N, dtype=np.float64).T,
        rouge_l_per_sample=np.asarray(rouge_l_N, dtype=np.float64),
    )
