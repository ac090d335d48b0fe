"""Lossless baselines: the PCA rotation and the neuron (standard) basis."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from circuitsae.dictionaries.base import Dictionary
from circuitsae.errors import CircuitSAEError


class PCADictionary(Dictionary):
    r"""All principal components of a site's activations, i.e. a rotation.

    ::

        codes = (x − μ) Vᵀ        V ∈ R^{d×d}, orthonormal rows, by decreasing variance
        x̂     = codes V + μ       (exact: PCA with every component loses nothing)

    Feature j is the j-th principal direction; patching it moves x along that
    direction, which is the PCA baseline of Cunningham et al. §4.
    """

    architecture: ClassVar[str] = "pca"
    saelens_refusal: ClassVar[str] = "a rotation onto principal components"

    def __init__(self, d: int, d_dict: "int | None" = None) -> None:
        if d_dict not in (None, d):
            raise CircuitSAEError(f"a PCA dictionary keeps all components: d_dict must equal d={d}")
        super().__init__(d, d)
        self.register_buffer("W_dec", torch.eye(d))
        self.register_buffer("b_dec", torch.zeros(d))
        self.register_buffer("explained_variance", torch.zeros(d))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_dec.T

    @classmethod
    @torch.no_grad()
    def fit(cls, x: "torch.Tensor | Any", site: "str | None" = None, max_rows: "int | None" = None) -> PCADictionary:
        """Fit on a tensor ``[n, d]`` or on the train split of an :class:`ActivationStore` (streamed, float64).

        The sums are taken where the activations are (a GPU tensor is fitted on the GPU); the fitted
        dictionary is on the CPU, like every freshly made one.
        """
        if isinstance(x, torch.Tensor):
            chunks, d, meta = [x], x.shape[-1], {}
        else:
            store = x
            if site is None:
                raise CircuitSAEError("PCADictionary.fit(store, site=...) needs the site to fit")
            chunks = _store_chunks(store, site, max_rows)
            d, meta = (
                store.d,
                {
                    "model": store.config["model"],
                    "site": site,
                    "store": str(store.root),
                    "first_position": int(store.meta["first_position"]),
                },
            )
        n, s1, s2 = 0, 0.0, 0.0
        for c in chunks:
            c = c.reshape(-1, d).double()
            if not bool(torch.isfinite(c).all()):
                raise CircuitSAEError(
                    "PCA cannot be fitted on activations with NaN or inf (a float16 store overflowing?)"
                )
            n, s1, s2 = n + c.shape[0], s1 + c.sum(0), s2 + c.T @ c
        if n < 2:
            raise CircuitSAEError(f"PCA needs at least 2 activations, got {n}")
        mean = s1 / n
        cov = (s2 - n * torch.outer(mean, mean)) / (n - 1)
        evals, evecs = torch.linalg.eigh(cov)  # ascending: flip to decreasing variance
        evals, evecs = evals.flip(0), evecs.flip(1)
        pca = cls(d)  # on the CPU; copy_ brings the fitted values over from wherever they were computed
        pca.W_dec.copy_(evecs.T.float())
        pca.b_dec.copy_(mean.float())
        pca.explained_variance.copy_(evals.clamp_min(0).float())
        pca.meta.update(meta, fitted_rows=n)
        return pca


def _store_chunks(store: Any, site: str, max_rows: "int | None") -> Any:
    n = 0
    total = store.n_rows("train") if max_rows is None else min(max_rows, store.n_rows("train"))
    with tqdm(total=total, unit="act", unit_scale=True, desc=f"fit PCA {site}", leave=False) as bar:
        for i in range(store.meta["splits"]["train"]["shards"]):
            if max_rows is not None and n >= max_rows:
                return
            x = store.shard(site, "train", i).float()
            x = x if max_rows is None else x[: max_rows - n]
            n += x.shape[0]
            bar.update(x.shape[0])
            yield x


class IdentityDictionary(Dictionary):
    """The neuron (standard) basis: codes = x, directions = the unit vectors e_i."""

    architecture: ClassVar[str] = "identity"
    saelens_refusal: ClassVar[str] = "the activations themselves"

    def __init__(self, d: int, d_dict: "int | None" = None) -> None:
        if d_dict not in (None, d):
            raise CircuitSAEError(f"the identity dictionary has d_dict = d = {d}")
        super().__init__(d, d)
        self.register_buffer("W_dec", torch.eye(d), persistent=False)
        self.b_dec = None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes

    def config(self) -> dict[str, Any]:
        return {"d": self.d, "d_dict": self.d_dict}
