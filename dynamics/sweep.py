"""Run a recipe over a parameter grid × seeds on dask.distributed; one Dataset back.

::

    ds = sweep(train_tiny_lm_flat, {"lr": [1e-3, 3e-3, 1e-2], "qk_layernorm": [False, True]},
               seeds=[0, 1], fixed={"steps": 500})
    ds["val_loss"].isel(step=-1).mean("seed")          # dims (lr, qk_layernorm)

A *recipe* is any function ``recipe(**params, seed=seed) -> xarray.Dataset``; each grid point
and seed is one task.  Tasks run on a dask.distributed cluster: by default a ``LocalCluster``
of worker *processes* made for the sweep and closed afterwards
(:func:`dynamics._dask.local_client`: one thread each, no dashboard, and without the
``MALLOC_TRIM_THRESHOLD_`` dask's nanny would export, which slows allocation-heavy torch code
in the workers up to ~2×); otherwise the ``Client`` or scheduler address given.  dask re-runs
the tasks of a worker that dies (up to its ``distributed.scheduler.allowed-failures`` setting,
3 by default), so a lost worker costs time, not results.  ``client="serial"`` runs the same
tasks one after another in this process.

The results are combined with the grid keys and ``seed`` as new leading dimensions (in that
order).  Coordinates that differ between runs gain those dimensions: ``time = lr × step``
becomes ``(lr, …, step)`` when ``lr`` is swept.  A recipe's own scalar ``seed`` coordinate, or
scalar coordinates named like a grid key, are replaced by the dimension coordinates.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr
from traindyn.dynamics import records
from traindyn.dynamics._dask import local_client

__all__ = ["sweep"]

Recipe = Callable[..., xr.Dataset]


def _run(recipe: Recipe, params: dict[str, Any], seed: int, fixed: dict[str, Any]) -> xr.Dataset:
    ds = recipe(**fixed, **params, seed=seed)
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"recipe {getattr(recipe, '__name__', recipe)!r} returned "
                        f"{type(ds).__name__}; a recipe must return an xarray.Dataset")
    return ds.load()


@contextlib.contextmanager
def _client(client: Any, n_workers: int) -> Iterator[Any]:
    from dask.distributed import Client

    if client is None:
        with local_client(n_workers) as made:
            yield made
    elif isinstance(client, str):
        with Client(client) as made:
            yield made
    else:
        yield client


def _coord_value(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, str, np.number)):
        return value
    return str(value)


def sweep(
    recipe: Recipe,
    grid: Mapping[str, Sequence[Any]],
    seeds: Sequence[int] = (0,),
    client: Any = None,
    fixed: Mapping[str, Any] | None = None,
    n_workers: int = 2,
) -> xr.Dataset:
    """Run ``recipe(**fixed, **point, seed=seed)`` for every grid point and seed.

    Parameters
    ----------
    recipe : callable
        Returns an ``xarray.Dataset`` (e.g. a ``dynamics.recipes`` function).  It is sent to
        worker processes, so it must be picklable (a module-level function, or anything
        cloudpickle handles).
    grid : mapping of name → sequence
        Parameters to sweep; each becomes a dimension of the result (values that are not
        numbers or strings are stored as strings in the coordinate).
    seeds : sequence of int
        The ``seed`` dimension.
    client : None, str, dask.distributed.Client or ``"serial"``
        ``None``: a ``LocalCluster`` with ``n_workers`` single-threaded worker processes,
        closed afterwards; a string: a scheduler address; a ``Client``: used as is;
        ``"serial"``: no dask, the tasks run here one by one.
    fixed : mapping, optional
        Keyword arguments passed to every run.
    n_workers : int
        Workers of the default ``LocalCluster``.

    Returns
    -------
    xarray.Dataset
        Dims ``(*grid, "seed", …recipe dims)``; attributes ``source`` (the recipe's) and
        ``parameters`` (JSON with the grid, seeds, fixed arguments and the recipe's name).
    """
    keys = list(grid)
    if "seed" in keys:
        raise ValueError("'seed' is a dimension of its own: pass seeds=, not grid['seed']")
    values = [list(grid[k]) for k in keys]
    for key, vals in zip(keys, values, strict=True):
        if not vals:
            raise ValueError(f"grid[{key!r}] is empty")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty")
    fixed = dict(fixed or {})
    overlap = set(fixed) & (set(keys) | {"seed"})
    if overlap:
        raise ValueError(f"{sorted(overlap)} are both fixed and swept")
    points = list(itertools.product(*values))
    tasks = [(dict(zip(keys, point, strict=True)), seed) for point in points for seed in seeds]

    if isinstance(client, str) and client == "serial":
        results = [_run(recipe, params, seed, fixed) for params, seed in tasks]
    else:
        with _client(client, n_workers) as cl:
            futures = cl.map(_run, [recipe] * len(tasks), [p for p, _ in tasks],
                             [s for _, s in tasks], [fixed] * len(tasks), pure=False)
            results = cl.gather(futures)

    coords = {key: [_coord_value(v) for v in vals] for key, vals in zip(keys, values,
                                                                          strict=True)}
    labelled = []
    for (params, seed), ds in zip(tasks, results, strict=True):
        drop = [name for name in [*keys, "seed"] if name in ds.coords and ds[name].ndim == 0]
        ds = ds.drop_vars(drop)
        new_dims = {key: [_coord_value(params[key])] for key in keys}
        new_dims["seed"] = [seed]
        labelled.append(ds.expand_dims(new_dims))

    def nest(items: list[xr.Dataset], depth: int) -> Any:
        if depth == len(keys):
            return items
        size = len(items) // len(values[depth])
        return [nest(items[i * size:(i + 1) * size], depth + 1)
                for i in range(len(values[depth]))]

    combined = xr.combine_nested(nest(labelled, 0), concat_dim=[*keys, "seed"],
                                 data_vars="all", coords="different", compat="equals",
                                 join="outer", combine_attrs="drop_conflicts")
    combined = combined.assign_coords(seed=("seed", np.array(seeds, dtype=np.int64),
                                            {"long_name": records.DIMS["seed"], "units": "1"}))
    for key in keys:
        combined[key].attrs.setdefault("long_name", f"swept parameter {key}")
        combined[key].attrs.setdefault("units", "1")
    first = results[0].attrs
    combined.attrs = {
        **{k: v for k, v in combined.attrs.items() if k != "parameters"},
        "source": first.get("source", f"traindyn sweep of {getattr(recipe, '__name__', recipe)}"),
        "parameters": records.params_attr(dict(
            recipe=f"{getattr(recipe, '__module__', '')}.{getattr(recipe, '__qualname__', '')}",
            grid={k: coords[k] for k in keys}, seeds=seeds, fixed=fixed)),
    }
    return combined
