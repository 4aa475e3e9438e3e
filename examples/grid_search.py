"""A scikit-learn grid search whose fits run on dcproto workers, through joblib.

Needs scikit-learn (pip install scikit-learn). Run it with no server (it starts an embedded
one):  python examples/grid_search.py
or on a named server: DCPROTO_USER=home python examples/grid_search.py

``import dcproto`` makes "dcproto" a joblib backend; every ``n_jobs=-1`` inside the
``parallel_config`` block then runs on the workers' slots. The search is also run serially,
and the two must agree.
"""

import os
import time

from joblib import parallel_config
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV
from sklearn.svm import SVC

import dcproto  # noqa: F401  (registers the "dcproto" joblib backend)

GRID = {"C": [0.1, 1, 10, 100], "gamma": [1e-4, 3e-4, 1e-3, 3e-3]}


def search(n_jobs):
    digits = load_digits()
    started = time.perf_counter()
    found = GridSearchCV(SVC(), GRID, cv=5, n_jobs=n_jobs).fit(digits.data, digits.target)
    return found, time.perf_counter() - started


if __name__ == "__main__":
    user = os.environ.get("DCPROTO_USER")
    options = {"user_name": user, "modules": ["sklearn"]} if user else {}
    with parallel_config(backend="dcproto", **options):
        parallel, took = search(n_jobs=-1)
    fits = len(parallel.cv_results_["params"]) * 5
    print(f"dcproto: best {parallel.best_params_}, accuracy {parallel.best_score_:.4f}")
    print(f"         {fits} fits in {took:.2f} s")
    serial, took = search(n_jobs=1)
    print(f"serial:  best {serial.best_params_}, accuracy {serial.best_score_:.4f}, {took:.2f} s")
    assert parallel.best_params_ == serial.best_params_
    assert (parallel.cv_results_["mean_test_score"] == serial.cv_results_["mean_test_score"]).all()
