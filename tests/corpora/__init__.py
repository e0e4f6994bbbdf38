"""Test corpora: small models written in the style of public research code, each with its
planted truth (:class:`corpora.case.RealCodeCase`). Test data, not library code: the tests
import them as ``corpora.*`` (``tests/`` is on ``sys.path`` under pytest's default import mode;
scripts such as ``benchmarks/analyze_bench.py`` insert it).

* :mod:`corpora.realcode` — the corpus the discovery was developed against;
* :mod:`corpora.realcode_extra` — a held-out corpus written afterwards.

Models and fixtures several test files share, written once here (no planted truth):

* :mod:`corpora.zca` — hand-written ZCA whitening (stateless, and with running statistics);
* :mod:`corpora.gcp` — covariance pooling with a raw eigh square root (:func:`corpora.gcp.cov_sqrt`);
* :mod:`corpora.unsafe` — a pickle payload that runs code when loaded (safe loads must refuse it).

Checks the OW tests share are in ``tests/ow_checks.py``.
"""
