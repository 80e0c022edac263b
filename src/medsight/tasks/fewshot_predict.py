"""Few-shot inference: segment a structure from annotated examples given at run time, with a
checkpoint of :mod:`medsight.tasks.fewshot`; no training at query time. Slices are preprocessed as in
training (:mod:`medsight.transforms.slices`); predictions are resized back to each slice's own shape,
so masks come out in the query's geometry.

Inference (:class:`FewShotPredictor`):

- 2D images: every support (image, mask) is one shot.
- Volumes, chunk protocol (Roy et al. 2020, SSL-ALPNet; they use 3 chunks, medsight's default is
  ``DEFAULT_CHUNKS`` = 12: on hippocampus cases outside the benchmark's queries, 1-shot Dice rose by
  1.7-7.3 points from 3 to 12 chunks and levelled off beyond): the support's labelled slice range
  ``[s0, s1]`` (``n = s1 - s0 + 1`` slices) is split into ``chunks`` equal chunks, chunk ``c``
  represented by its centre slice ``s0 + floor((c + 1/2) n / chunks)`` (the nearest labelled
  slice if that one happens to be empty). The query range is the same fraction of the query's
  slice axis as the support range is of the support's (``floor(s0 / N_s * N_q)`` to
  ``ceil((s1 + 1) / N_s * N_q) - 1``; published protocols take it from the query's own labels,
  which a user does not have; pass ``query_range`` to do that). Query slice ``q`` belongs to chunk
  ``floor((q - q0) chunks / n_q)`` and is segmented with that chunk's support slice. Slices
  outside the query range are background.
- ``neighbours`` (default ``DEFAULT_NEIGHBOURS`` = 1): chunk ``c`` is segmented with the support
  slices of chunks ``c - neighbours .. c + neighbours`` (those that exist), their foreground
  probabilities averaged. The chunk boundaries are only a guess at which support slice matches a
  query slice (the two scans differ in position and extent); the neighbours hedge that guess.
  ``neighbours=0`` is the published protocol.
- k shots (``combine``): ``"ensemble"`` (default) segments the query once per shot and averages the
  foreground probabilities; ``"average"`` averages the prototypes or conditioning weights of the
  shots into one (PANet, Roy et al.). With 5 shots the ensemble was better for the prototype head on
  hippocampus in the benchmark, by up to 7.8 Dice points (see the README).
- ``largest_component``: keep only the largest connected piece of the mask (26-connectivity in 3D),
  for structures known to be in one piece.
- Slice propagation inside one volume: the slices with a non-empty mask are the annotated ones;
  every other slice is segmented with the nearest annotated slice as support. Walking away from
  the annotations, once a slice comes out empty the slices beyond it stay empty
  (``stop_at_empty``): a structure does not reappear after a gap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsight.errors import MedsightError
from medsight.scan import Scan, align_to, fill_non_finite
from medsight.transforms.slices import (
    chunk_centres,
    chunk_of,
    from_slices,
    matching_range,
    normalise_intensity,
    resize,
    to_slices,
)

DEFAULT_CHUNKS = 12
DEFAULT_NEIGHBOURS = 1
COMBINE = ("ensemble", "average")


# -- inference -------------------------------------------------------------------------------------
def _binary_mask(image: Scan, mask: Scan) -> np.ndarray:
    """Spatial boolean mask of a support pair, checked against its image."""
    arr = align_to(
        mask, image, "mask", f"image {Path(image.path).name}" if image.path else "image", True
    ).array
    if arr.shape[0] > 1 and not all(np.array_equal(arr[0], arr[c]) for c in range(1, arr.shape[0])):
        raise MedsightError(f"mask has {arr.shape[0]} differing channels; expected one mask", mask.path)
    binary = arr[0] > 0
    if not binary.any():
        raise MedsightError("support mask is empty: mark the structure to segment", mask.path)
    return binary


@dataclass
class PreparedSupport:
    """A support set embedded once by :meth:`FewShotPredictor.prepare`."""

    ndim: int
    channels: int
    conditions: list[list[dict]]  # per chunk (a single one for 2D images): one per shot, or one averaged
    ranges: list[tuple[int, int, int]]  # per shot: labelled slice range lo, hi and slice count
    chunks: int
    paths: list


class FewShotPredictor:
    """Segment with a checkpoint written by few-shot training (``best.pt``/``last.pt``)."""

    def __init__(self, ckpt_path: str | Path, batch: int = 64, head: str | None = None):
        """``head``: which head of a ``fewshot-shared`` checkpoint to use (default: local-prototype)."""
        import torch

        from medsight.engine import checkpoint
        from medsight.models.fewshot import FewShotNet, shared_heads

        self.path = Path(ckpt_path)
        payload = checkpoint.load(self.path)
        if payload["model"].get("kind") != "fewshot-2d":
            raise MedsightError(
                f"is a '{payload['model']['name']}' checkpoint, not a few-shot one (train with fewshot-*)",
                self.path,
            )
        self.method = payload["model"]["name"]
        heads = payload["model"].get("heads") or [payload["model"]["head"]]
        kwargs = {k: v for k, v in payload["model"]["kwargs"].items() if k != "head"}
        if len(heads) == 1:
            if head not in (None, heads[0]):
                raise MedsightError(f"holds the '{heads[0]}' head only, not '{head}'", self.path)
            self.head = heads[0]
            self.model = FewShotNet(head=self.head, **kwargs)
            checkpoint.load_weights(self.model, payload, self.path)
        else:
            self.head = head or ("local-prototype" if "local-prototype" in heads else heads[0])
            if self.head not in heads:
                raise MedsightError(f"has no '{self.head}' head; it holds {', '.join(heads)}", self.path)
            nets = shared_heads(heads, kwargs)
            checkpoint.load_weights(nets, payload, self.path)
            self.model = nets[self.head]
        pre = payload["preprocessing"]
        self.size = tuple(pre["size"])
        self.slice_axis = int(pre["slice_axis"])
        self.in_channels = int(pre["in_channels"])
        self.channels = pre.get("channels")
        self.batch = int(batch)
        self.model.eval()
        self._torch = torch

    # -- input handling ------------------------------------------------------------------------
    def _image_array(self, scan: Scan) -> np.ndarray:
        """The channels the model reads; RGB/RGBA turns grey for a one-channel model."""
        array = fill_non_finite(scan).array
        if self.channels is not None and scan.channels > max(self.channels):
            array = array[list(self.channels)]
        elif array.shape[0] != self.in_channels:
            if self.in_channels == 1 and array.shape[0] in (3, 4):
                array = array[:3].astype(np.float32).mean(0, keepdims=True)
            else:
                raise MedsightError(
                    f"has {scan.channels} channel(s); this model reads {self.in_channels}", scan.path
                )
        return array

    def _working_slices(self, scan: Scan, only=None):
        """Normalised slices at working size, ``(S, C, h, w)`` tensor; ``only``: just these slice
        indices (the normalisation statistics are still those of the whole scan)."""
        slices = to_slices(normalise_intensity(self._image_array(scan)), self.slice_axis)
        return resize(slices if only is None else slices[list(only)], self.size)

    def _working_masks(self, masks: np.ndarray):
        """``(S, H, W)`` boolean -> soft masks at working size ``(S, h, w)``."""
        return resize(masks[:, None].astype(np.float32), self.size)[:, 0].clamp(0, 1)

    def _check_query(self, prepared: PreparedSupport, query: Scan) -> None:
        name = Path(prepared.paths[0]).name if prepared.paths and prepared.paths[0] else "the support"
        if prepared.channels != query.channels:
            raise MedsightError(
                f"query has {query.channels} channel(s) but support image {name} has {prepared.channels}",
                query.path,
            )
        if prepared.ndim != query.ndim:
            raise MedsightError(
                f"query is {query.ndim}D but support image {name} is {prepared.ndim}D", query.path
            )

    def _probabilities(self, queries, conditions: list[dict]):
        """Foreground probability ``(Q, h, w)`` of working-size queries, averaged over
        ``conditions`` (shots, neighbouring chunks); each query is embedded once for all of them."""
        torch = self._torch
        out = []
        with torch.no_grad():
            for start in range(0, len(queries), self.batch):
                batch = queries[start : start + self.batch]
                feats = self.model.embed(batch)
                out.append(
                    sum(
                        self.model.segment_features(feats, cond, batch.shape[-2:]).softmax(1)[:, 1]
                        for cond in conditions
                    )
                    / len(conditions)
                )
        return torch.cat(out)

    def _condition(self, images, masks):
        with self._torch.no_grad():
            return self.model.condition(images[None], masks[None])

    def _restore(self, probabilities, shape: tuple[int, int]) -> np.ndarray:
        """Working-size foreground probabilities ``(Q, h, w)`` -> boolean masks ``(Q, H, W)``."""
        import torch.nn.functional as F

        full = F.interpolate(probabilities[:, None], size=shape, mode="bilinear", align_corners=False)[:, 0]
        return full.numpy() > 0.5

    def _as_scan(self, query: Scan, mask: np.ndarray, largest_component: bool = False) -> Scan:
        if largest_component:
            from medsight.engine.infer import largest_components

            mask = largest_components(mask.astype(np.uint8)) > 0
        return Scan(mask[None].astype(np.uint8), query.affine.copy(), {"fewshot": self.method}, query.path)

    # -- public --------------------------------------------------------------------------------
    def prepare(
        self, support: list[tuple[Scan, Scan]], chunks: int = DEFAULT_CHUNKS, combine: str = "ensemble"
    ) -> PreparedSupport:
        """Embed a support set once; :meth:`segment` then serves any number of queries with it.

        Under the chunk protocol a chunk's conditioning depends on the support alone (its centre
        slices), so the whole support side is query-independent."""
        if not support:
            raise MedsightError("no support given: pass at least one (image, mask) pair")
        if chunks < 1:
            raise MedsightError(f"chunks must be >= 1, got {chunks}")
        if combine not in COMBINE:
            raise MedsightError(f"unknown k-shot combination '{combine}'; choose one of {', '.join(COMBINE)}")
        masks = [_binary_mask(image, mask) for image, mask in support]
        ndims, channels = {image.ndim for image, _ in support}, {image.channels for image, _ in support}
        if len(ndims) > 1 or len(channels) > 1:
            raise MedsightError(
                "support images differ in dimensionality or channel count", support[0][0].path
            )
        ndim, n_channels = ndims.pop(), channels.pop()
        paths = [image.path for image, _ in support]

        def conditions(images, shot_masks) -> list[dict]:
            if combine == "average":
                return [self._condition(images, shot_masks)]
            return [self._condition(images[i : i + 1], shot_masks[i : i + 1]) for i in range(len(images))]

        if ndim == 2:
            images = self._torch.cat([self._working_slices(image) for image, _ in support])
            cond = conditions(images, self._working_masks(np.stack(masks)))
            return PreparedSupport(ndim, n_channels, [cond], [], 1, paths)

        axis = self.slice_axis
        ranges, shots = [], []
        for (image, _), mask in zip(support, masks, strict=True):
            mask_slices = to_slices(mask[None], axis)[:, 0]
            labelled = np.flatnonzero(mask_slices.reshape(len(mask_slices), -1).any(1))
            lo, hi = int(labelled[0]), int(labelled[-1])
            # the nearest labelled slice if a chunk centre happens to be empty
            centres = [int(labelled[np.argmin(np.abs(labelled - c))]) for c in chunk_centres(lo, hi, chunks)]
            ranges.append((lo, hi, image.spatial_shape[axis]))
            # only the centre slices are resized: supports of any in-plane shape stack as shots
            shots.append((self._working_slices(image, centres), self._working_masks(mask_slices[centres])))
        per_chunk = [
            conditions(
                self._torch.stack([slices[c] for slices, _ in shots]),
                self._torch.stack([masks[c] for _, masks in shots]),
            )
            for c in range(chunks)
        ]
        return PreparedSupport(ndim, n_channels, per_chunk, ranges, chunks, paths)

    def segment(
        self,
        support: list[tuple[Scan, Scan]] | PreparedSupport,
        query: Scan,
        chunks: int = DEFAULT_CHUNKS,
        query_range: tuple[int, int] | None = None,
        combine: str = "ensemble",
        largest_component: bool = False,
        neighbours: int = DEFAULT_NEIGHBOURS,
    ) -> Scan:
        """Mask (uint8 0/1) of the support's structure in ``query``, with the query's affine.

        ``support``: (image, mask) pairs, or a :meth:`prepare`-d support (then ``chunks`` and
        ``combine`` are the ones it was prepared with)."""
        if neighbours < 0:
            raise MedsightError(f"neighbours must be >= 0, got {neighbours}")
        prepared = support if isinstance(support, PreparedSupport) else self.prepare(support, chunks, combine)
        self._check_query(prepared, query)
        if query.ndim == 2:
            probabilities = self._probabilities(self._working_slices(query), prepared.conditions[0])
            return self._as_scan(
                query, self._restore(probabilities, query.spatial_shape)[0], largest_component
            )

        axis = self.slice_axis
        n_query = query.spatial_shape[axis]
        if query_range is None:
            fractions = [matching_range((lo, hi), n, n_query) for lo, hi, n in prepared.ranges]
            q0 = int(round(np.mean([f[0] for f in fractions])))
            q1 = int(round(np.mean([f[1] for f in fractions])))
        else:
            q0, q1 = (int(v) for v in query_range)
            if not 0 <= q0 <= q1 < n_query:
                raise MedsightError(f"query_range {query_range} outside slices 0..{n_query - 1}", query.path)
        in_plane = tuple(n for a, n in enumerate(query.spatial_shape) if a != axis)
        out = np.zeros((n_query, *in_plane), dtype=bool)
        queries = self._working_slices(query, range(q0, q1 + 1))  # slices outside the range stay background
        for c in range(prepared.chunks):
            members = [q for q in range(q0, q1 + 1) if chunk_of(q, q0, q1, prepared.chunks) == c]
            if members:
                nearby = prepared.conditions[max(0, c - neighbours) : c + neighbours + 1]
                conds = [cond for chunk in nearby for cond in chunk]
                out[members] = self._restore(
                    self._probabilities(queries[[q - q0 for q in members]], conds), in_plane
                )
        return self._as_scan(query, from_slices(out, axis, 3), largest_component)

    def propagate(
        self, volume: Scan, mask: Scan, stop_at_empty: bool = True, largest_component: bool = False
    ) -> Scan:
        """Complete a partly annotated volume: slices with a non-empty mask are the supports."""
        binary = _binary_mask(volume, mask)
        if volume.ndim != 3:
            raise MedsightError("slice propagation needs a volume, not a 2D image", volume.path)
        axis = self.slice_axis
        mask_slices = to_slices(binary[None], axis)[:, 0]
        annotated = np.flatnonzero(mask_slices.reshape(len(mask_slices), -1).any(1))
        slices = self._working_slices(volume)
        n = len(mask_slices)
        nearest = {
            q: int(annotated[np.argmin(np.abs(annotated - q))]) for q in range(n) if q not in set(annotated)
        }
        out = mask_slices.copy()
        working_masks = self._working_masks(mask_slices[annotated])
        for k, s in enumerate(annotated):
            members = [q for q, src in nearest.items() if src == s]
            if not members:
                continue
            cond = self._condition(slices[s : s + 1], working_masks[k : k + 1])
            out[members] = self._restore(self._probabilities(slices[members], [cond]), mask_slices.shape[1:])
        if stop_at_empty:
            # nearest first, so the neighbour towards the support is settled before q
            for q in sorted(nearest, key=lambda q: abs(q - nearest[q])):
                towards_support = q - 1 if q > nearest[q] else q + 1
                if towards_support in nearest and not out[towards_support].any():
                    out[q] = False
        return self._as_scan(volume, from_slices(out, axis, 3), largest_component)
