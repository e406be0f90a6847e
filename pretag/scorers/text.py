"""Prose scorers: PII, profanity, sentiment and reading level, each a thin batch wrapper over its library.

The libraries load lazily on the first call, so building a scorer (e.g. to validate a schema) is cheap and a
scorer object pickles to worker processes before any model is loaded.
"""

from __future__ import annotations

import logging

from pretag.scorers import Scorer, ScorerError

logger = logging.getLogger(__name__)


class PiiScorer(Scorer):
    """The paper's PII score: scrubadub detections (emails, URLs, credentials, Twitter handles, card and social
    security numbers, ...) per character of the segment."""

    name = "pii"
    meaning = "scrubadub PII detections per character; higher is worse, 0 = nothing detected"
    options = {"detectors": "list of scrubadub detector names to use (default: scrubadub's defaults)"}

    def __init__(self, **opts) -> None:
        super().__init__(**opts)
        self._scrubber = None

    def _get(self):
        if self._scrubber is None:
            import scrubadub

            if "detectors" in self.opts:
                self._scrubber = scrubadub.Scrubber(detector_list=list(self.opts["detectors"]))
            else:
                self._scrubber = scrubadub.Scrubber()
        return self._scrubber

    def detections(self, text: str) -> int:
        return sum(1 for _ in self._get().iter_filth(text)) if text.strip() else 0

    def score_texts(self, texts: list[str]) -> list[float]:
        return [self.detections(t) / max(len(t), 1) for t in texts]

    def __getstate__(self):
        return {**self.__dict__, "_scrubber": None}


class ProfanityScorer(Scorer):
    """alt-profanity-check: a linear SVM over character/word n-grams, trained on toxic-comment data; one
    vectorised call per batch."""

    name = "profanity"
    meaning = "alt-profanity-check probability that the text is offensive (0..1); higher is worse"

    def score_texts(self, texts: list[str]) -> list[float]:
        from profanity_check import predict_prob

        return [float(p) for p in predict_prob(list(texts))] if texts else []


class SentimentScorer(Scorer):
    """VADER sentiment, a stand-in for emotion tags such as ``<angry>``.

    ``measure: compound`` (default) is VADER's compound score in [-1, 1], higher is better. ``measure: neg`` is the
    share of the text's sentiment-bearing weight that is negative, in [0, 1], higher is worse: a positive number
    with a true zero, so a misalignment score built on it has a meaningful ratio (MLE ÷ conditional), and a single
    word scores 1.0 exactly when VADER's lexicon calls it negative (what inline tags need, ``pretag inline``).
    """

    name = "sentiment"
    meaning = ("VADER sentiment: compound in [-1, 1], higher is better (more positive); with measure: neg, the "
               "negative share in [0, 1], higher is worse")
    options = {"measure": "compound (default; higher is better) or neg (negative share; higher is worse)"}
    MEASURES = ("compound", "neg")

    def __init__(self, **opts) -> None:
        super().__init__(**opts)
        self.measure = opts.get("measure", "compound")
        if self.measure not in self.MEASURES:
            raise ScorerError(f"sentiment: measure must be one of {', '.join(self.MEASURES)}, not {self.measure!r}")
        self._analyzer = None

    def score_texts(self, texts: list[str]) -> list[float]:
        if self._analyzer is None:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

            self._analyzer = SentimentIntensityAnalyzer()
        m = self.measure
        return [float(self._analyzer.polarity_scores(t)[m]) if t.strip() else 0.0 for t in texts]

    def __getstate__(self):
        return {**self.__dict__, "_analyzer": None}


class ReadingLevelScorer(Scorer):
    """A textstat grade level (US school grade), for intensity bands such as ``<|grade:6-10|>``.

    The default metric is the Automated Readability Index: it counts characters and words, so it needs no
    pronunciation dictionary (textstat's syllable-based metrics, e.g. Flesch-Kincaid, download NLTK's cmudict on
    first use, which an offline machine cannot). Scores are clipped at 0: very short segments give negative
    grades, which mean nothing.
    """

    name = "reading_level"
    meaning = "textstat grade level (default: Automated Readability Index), clipped at 0; higher = harder"
    options = {"metric": "textstat function name (default automated_readability_index)"}

    def __init__(self, **opts) -> None:
        super().__init__(**opts)
        import textstat

        self.metric = opts.get("metric", "automated_readability_index")
        fn = getattr(textstat, self.metric, None)
        if not callable(fn):
            raise ScorerError(f"reading_level: textstat has no metric {self.metric!r}")

    def score_texts(self, texts: list[str]) -> list[float]:
        import textstat

        fn = getattr(textstat, self.metric)
        out = []
        for t in texts:
            try:
                out.append(max(0.0, float(fn(t))) if t.strip() else 0.0)
            except LookupError as e:  # an NLTK resource missing: say which, do not hang on a download
                raise ScorerError(
                    f"reading_level: textstat metric {self.metric!r} needs an NLTK resource that is not installed "
                    f"({str(e).strip().splitlines()[0] if str(e).strip() else e}); use the default metric "
                    "automated_readability_index or install the resource"
                ) from e
        return out
