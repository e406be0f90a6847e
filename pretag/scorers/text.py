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
    """VADER's compound sentiment, a stand-in for emotion tags such as ``<angry>``."""

    name = "sentiment"
    meaning = "VADER compound sentiment in [-1, 1]; higher is better (more positive)"

    def __init__(self, **opts) -> None:
        super().__init__(**opts)
        self._analyzer = None

    def score_texts(self, texts: list[str]) -> list[float]:
        if self._analyzer is None:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

            self._analyzer = SentimentIntensityAnalyzer()
        return [float(self._analyzer.polarity_scores(t)["compound"]) if t.strip() else 0.0 for t in texts]

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
