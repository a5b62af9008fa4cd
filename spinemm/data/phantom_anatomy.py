"""The phantom's analytic lumbar spine: per-study anatomy, tissue rendering and finding points.

Geometry. Patient space is DICOM LPS in mm (+x = patient's left, +y = posterior, +z = head). The
spine lies in the mid-sagittal plane ``x = x0``. Its centreline (the axis of the vertebral bodies) is
an arc of a circle whose centre lies behind the patient, so the mid-lumbar spine is the most anterior
part: a lordosis. Every point gets local coordinates

- ``s``: arc length along the centreline, mm, increasing towards the feet, 0 at the L3/L4 disc;
- ``u``: offset from the centreline towards posterior, mm (the circle's radius minus the distance
  to its centre);
- ``w = x - x0``: lateral offset, mm, positive towards the patient's left.

Every structure is a simple shape in ``(s, u, w)``, so a slice of any orientation is rendered by
evaluating the model at the patient coordinates of its pixels: the sagittal and axial series agree
in patient space by construction.

Severity drives geometry at each graded disc level: the spinal canal and the lateral (subarticular)
recesses shrink around the disc, and the neural foramina shrink, all in proportion to the continuous
latent severity of that (condition, level). Disc nucleus T2 signal also falls with the level's
overall degeneration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Anatomy", "sample_anatomy", "render", "finding_point", "curve_frame", "TISSUES"]

#: Tissue classes of the label map; the index is the tissue id.
TISSUES = ("air", "fat", "muscle", "marrow", "cortex", "annulus", "nucleus", "csf", "nerve", "ligament")
AIR, FAT, MUSCLE, MARROW, CORTEX, ANNULUS, NUCLEUS, CSF, NERVE, LIGAMENT = range(len(TISSUES))

# Relative signal of each tissue (order of TISSUES). T1: fat and marrow bright, CSF dark. T2: CSF
# and a healthy disc nucleus bright, fat intermediate-bright.
_SIGNAL = {
    "T1": np.array([0.0, 1.0, 0.38, 0.72, 0.08, 0.28, 0.42, 0.14, 0.45, 0.12]),
    "T2": np.array([0.0, 0.62, 0.22, 0.45, 0.06, 0.12, 0.90, 1.00, 0.30, 0.10]),
}

# Vertebral body heights (T11, T12, L1..L5) and disc heights (T11/T12, T12/L1, L1/L2..L5/S1), mm at
# scale 1. The five graded discs are the last five.
_BODY_H = np.array([24.0, 25.0, 25.0, 26.0, 27.0, 27.0, 26.0])
_DISC_H = np.array([6.0, 7.0, 8.0, 9.0, 10.0, 10.0, 8.0])
_BODY_AP = np.array([14.5, 15.0, 15.5, 16.0, 16.5, 17.0, 17.0])  # semi-axis, anterior-posterior
_BODY_LAT = np.array([20.0, 21.0, 21.5, 22.0, 23.0, 24.0, 25.0])  # semi-axis, left-right
_SACRUM_H = 85.0
N_GRADED = 5
_FIRST_GRADED = len(_DISC_H) - N_GRADED

# How far a maximal (latent 3) severity narrows each structure, as a fraction of its size.
_K_CANAL, _K_FORAMEN, _K_RECESS = 0.68, 0.6, 0.75
_KIND_BODY, _KIND_DISC, _KIND_SACRUM, _KIND_NONE = range(4)


@dataclass(frozen=True)
class Anatomy:
    """One study's spine. Lengths in mm; ``sev`` is ``[5 conditions, 5 levels]`` latent severity."""

    p0: np.ndarray  # [3] centreline point at the L3/L4 disc (s = 0)
    t0: np.ndarray  # [3] unit tangent at s = 0, pointing to the feet
    n0: np.ndarray  # [3] unit normal at s = 0, pointing posterior
    radius: float  # lordosis radius of the centreline arc
    scale: float
    seg_start: np.ndarray  # [G] start of each segment along s
    seg_kind: np.ndarray  # [G] _KIND_* of each segment
    seg_ap: np.ndarray  # [G] body semi-axis AP at the segment's top
    seg_lat: np.ndarray  # [G] body semi-axis lateral at the segment's top
    disc_s: np.ndarray  # [7] disc centres along s (the last five are L1/L2..L5/S1)
    sev: np.ndarray  # [5, 5] latent severity per (condition, level), LABEL_COLUMNS order
    canal_ap: float  # healthy canal AP diameter
    canal_w: float  # healthy canal width including the lateral recesses
    u_back: float  # posterior wall of the vertebral bodies (u)
    signal: dict  # sequence -> [len(TISSUES)] relative signal, jittered per study
    nucleus_t2: np.ndarray  # [7] T2 signal of each disc nucleus

    @property
    def canal_u(self) -> float:
        """u of the canal's centre."""
        return self.u_back + 1.5 * self.scale + self.canal_ap / 2

    @property
    def foramen_w(self) -> float:
        """|w| of the neural foramina."""
        return 0.5 * self.canal_w + 5.0 * self.scale

    @property
    def conus_s(self) -> float:
        """Where the spinal cord ends (a little above the L1/L2 disc)."""
        return float(self.disc_s[_FIRST_GRADED] - 6.0 * self.scale)


def sample_anatomy(rng: np.random.Generator, sev: np.ndarray) -> Anatomy:
    """A random spine (position, size, lordosis, contrast) carrying the latent severities ``sev [5, 5]``."""
    a = float(rng.uniform(0.9, 1.1))
    # Segments from the top: T11 body, disc, T12, disc, L1, ..., L5, L5/S1 disc, sacrum, nothing.
    bodies, discs = _BODY_H * a, _DISC_H * a
    edges, kinds, ap, lat = [], [], [], []
    pos = 0.0
    for i in range(len(bodies)):
        for h, kind, j in ((bodies[i], _KIND_BODY, i), (discs[i], _KIND_DISC, i)):
            edges.append(pos)
            kinds.append(kind)
            nxt = min(j + 1, len(bodies) - 1) if kind == _KIND_DISC else j
            ap.append(0.5 * a * (_BODY_AP[j] + _BODY_AP[nxt]) if kind == _KIND_DISC else a * _BODY_AP[j])
            lat.append(0.5 * a * (_BODY_LAT[j] + _BODY_LAT[nxt]) if kind == _KIND_DISC else a * _BODY_LAT[j])
            pos += h
    edges += [pos, pos + _SACRUM_H * a]
    kinds += [_KIND_SACRUM, _KIND_NONE]
    ap += [a * 17.0, 0.0]  # the last segment (below the sacrum) holds no spine
    lat += [a * 26.0, 0.0]
    edges = np.asarray(edges)
    disc_s = edges[1:-2:2] + discs / 2
    shift = disc_s[_FIRST_GRADED + 2]  # s = 0 at the L3/L4 disc
    edges, disc_s = edges - shift, disc_s - shift
    edges[0] = -1e4  # the top body (T11) reaches past any field of view

    alpha = np.deg2rad(rng.uniform(-6.0, 6.0))  # tilt of the L3/L4 disc
    t0 = np.array([0.0, np.sin(alpha), -np.cos(alpha)])
    n0 = np.array([0.0, np.cos(alpha), np.sin(alpha)])
    p0 = np.array([rng.uniform(-15, 15), rng.uniform(-40, 0), rng.uniform(-30, 30)])

    jitter = {k: v * rng.uniform(0.9, 1.1, size=v.shape) for k, v in _SIGNAL.items()}
    level_degeneration = np.clip(sev, 0.0, 3.0).mean(axis=0) / 3.0  # [5]
    nucleus = np.full(len(disc_s), jitter["T2"][NUCLEUS])
    nucleus[_FIRST_GRADED:] *= 1.0 - 0.5 * level_degeneration
    return Anatomy(
        p0=p0,
        t0=t0,
        n0=n0,
        radius=float(rng.uniform(200.0, 380.0)),
        scale=a,
        seg_start=edges,
        seg_kind=np.asarray(kinds),
        seg_ap=np.asarray(ap),
        seg_lat=np.asarray(lat),
        disc_s=disc_s,
        sev=np.asarray(sev, dtype=np.float64),
        canal_ap=a * rng.uniform(14.0, 16.5),
        canal_w=a * rng.uniform(23.0, 26.0),
        u_back=float(np.max(_BODY_AP) * a),
        signal=jitter,
        nucleus_t2=nucleus,
    )


def curve_frame(anat: Anatomy, s: float) -> tuple[np.ndarray, np.ndarray]:
    """(tangent towards the feet, normal towards posterior) of the centreline at arc length ``s``."""
    c, sn = np.cos(s / anat.radius), np.sin(s / anat.radius)
    return c * anat.t0 + sn * anat.n0, c * anat.n0 - sn * anat.t0


def to_patient(anat: Anatomy, s: float, u: float, w: float) -> np.ndarray:
    """Patient LPS point ``[3]`` of local coordinates (s, u, w)."""
    centre = anat.p0 + anat.radius * anat.n0
    c, sn = np.cos(s / anat.radius), np.sin(s / anat.radius)
    return centre + (anat.radius - u) * (-c * anat.n0 + sn * anat.t0) + np.array([w, 0.0, 0.0])


def _local(anat: Anatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray):
    """Patient coordinates (arrays of one shape) -> local (s, u, w), float32."""
    cy, cz = anat.p0[1] + anat.radius * anat.n0[1], anat.p0[2] + anat.radius * anat.n0[2]
    vy, vz = y - np.float32(cy), z - np.float32(cz)
    along = vy * np.float32(anat.t0[1]) + vz * np.float32(anat.t0[2])
    back = -(vy * np.float32(anat.n0[1]) + vz * np.float32(anat.n0[2]))
    s = np.float32(anat.radius) * np.arctan2(along, back)
    u = np.float32(anat.radius) - np.hypot(vy, vz)
    return s, u, x - np.float32(anat.p0[0])


def _inside(*terms: tuple[np.ndarray, np.ndarray | float]) -> np.ndarray:
    """Ellipse/ellipsoid test: sum((offset / semi-axis)^2) <= 1 over the given (offset, semi) pairs."""
    total = 0.0
    for offset, semi in terms:
        total = total + (offset / semi) ** 2
    return total <= 1.0


def _narrow(sev: np.ndarray) -> np.ndarray:
    return np.clip(sev, 0.0, 3.0) / 3.0


def tissue_map(anat: Anatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tissue id (uint8) and nearest-disc index (int8) at patient points ``x, y, z`` (one shape)."""
    a = np.float32(anat.scale)
    s, u, w = _local(anat, x, y, z)
    # Torso: an elliptic cylinder along z (subcutaneous fat over muscle), centred a little in front
    # of the L3/L4 disc; it does not follow the spine's curve.
    out = np.full(s.shape, AIR, dtype=np.uint8)
    ty = y - np.float32(anat.p0[1] - 10 * a)
    out[_inside((w, 150 * a), (ty, 105 * a))] = FAT
    out[_inside((w, 136 * a), (ty, 91 * a))] = MUSCLE
    # The spine is evaluated only inside a box around it (a third or less of a slice's pixels).
    roi = np.flatnonzero((np.abs(w) < 32 * a) & (u > -22 * a) & (u < 64 * a) & (s < anat.seg_start[-1]))
    disc = np.zeros(s.shape, dtype=np.int8)
    spine, disc.flat[roi] = _spine(anat, s.flat[roi], u.flat[roi], w.flat[roi], out.flat[roi])
    out.flat[roi] = spine
    return out, disc


def _spine(anat: Anatomy, s: np.ndarray, u: np.ndarray, w: np.ndarray, out: np.ndarray):
    """Paint the spine over the torso tissue ``out`` at local points (1-D arrays, float32).

    Returns (tissue uint8, nearest disc index int8), each like ``s``.
    """
    a = np.float32(anat.scale)
    aw = np.abs(w)
    seg = np.searchsorted(anat.seg_start, s, side="right") - 1
    kind = anat.seg_kind[seg]
    t = s - anat.seg_start[seg].astype(np.float32)
    seg_len = np.diff(anat.seg_start, append=np.inf)[seg].astype(np.float32)

    # Nearest disc and the Gaussian weight of its level-specific narrowing along s.
    mids = 0.5 * (anat.disc_s[1:] + anat.disc_s[:-1])
    k = np.searchsorted(mids, s)
    ds = s - anat.disc_s[k].astype(np.float32)
    g = np.exp(-((ds / (7.0 * a)) ** 2))
    sev = np.zeros((5, len(anat.disc_s)), dtype=np.float32)
    sev[:, _FIRST_GRADED:] = _narrow(anat.sev)
    canal_n = _K_CANAL * sev[0][k] * g  # fraction of the canal lost here

    cu, ap, cw = np.float32(anat.canal_u), np.float32(anat.canal_ap), np.float32(anat.canal_w)
    back = cu + ap / 2
    # Posterior elements: pedicles, facets and laminae as one bony block around the canal that
    # narrows towards the back, with the spinous process behind it; at disc levels the
    # interlaminar gap holds ligamentum flavum and interspinous fat.
    depth = u - np.float32(anat.u_back)
    lateral = 0.5 * cw + 13 * a - 0.5 * np.maximum(depth - 12 * a, 0)
    arch = (aw < lateral) & (depth > 0) & (u < back + 9 * a)
    out[arch] = MARROW
    spinous = (kind == _KIND_BODY) & (t > 0.2 * seg_len) & (aw < 3 * a) & (u > back) & (u < back + 28 * a)
    out[spinous] = MARROW
    interlaminar = arch & (kind == _KIND_DISC) & (aw < 0.33 * cw + 3 * a) & (u > cu)
    out[interlaminar & (aw < 3 * a)] = FAT
    out[interlaminar & (u < back + 3 * a)] = LIGAMENT

    # Neural foramina: fat-filled ellipsoids between the pedicles, each with its exiting nerve root.
    # Narrowing replaces the perineural fat with low-signal tissue (disc, osteophyte, ligament).
    ff = 1.0 - _K_FORAMEN * np.where(w > 0, sev[1][k], sev[2][k])
    fs = np.float32(anat.disc_s)[k] - 2.5 * a
    fu = np.float32(anat.u_back) + 5 * a
    fw = aw - np.float32(anat.foramen_w)
    out[_inside((fw, 5 * a), (s - fs, 8 * a), (u - fu, 5 * a))] = LIGAMENT
    foramen = _inside((fw, 5 * a), (s - fs, 8 * a * ff), (u - fu, 5 * a * ff))
    out[foramen] = FAT
    out[foramen & _inside((fw, 5 * a), (s - fs + 3 * a, 2.5 * a), (u - fu, 2.5 * a))] = NERVE

    # Epidural fat around the central canal, effaced where the canal narrows.
    half_ap = ap * (1.0 - canal_n) / 2
    half_w = 0.33 * cw * (1.0 - 0.4 * canal_n)
    fat = 1.5 * a * np.maximum(1.0 - 2.0 * canal_n, 0.0)
    out[_inside((w, half_w + fat), (u - cu, half_ap + fat))] = FAT

    # Vertebral bodies, sacrum and discs. The sacrum tapers towards its tip; a disc bulges into the
    # canal by as much as the canal narrows.
    taper = np.where(kind == _KIND_SACRUM, 1.0 - 0.55 * t / seg_len, 1.0).astype(np.float32)
    semi_ap = anat.seg_ap[seg].astype(np.float32) * taper
    semi_lat = anat.seg_lat[seg].astype(np.float32) * taper
    centre = np.float32(anat.u_back) - semi_ap
    bulge = np.where(u > centre, ap * canal_n / 2 + 0.8 * a, 0.0)
    q = ((u - centre) / (semi_ap + bulge)) ** 2 + (w / semi_lat) ** 2
    # A thin fat plane around bodies and discs sets them off from the psoas and the abdomen.
    halo = ((u - centre) / (semi_ap + bulge + 3 * a)) ** 2 + (w / (semi_lat + 3 * a)) ** 2
    out[(halo <= 1.0) & (u < anat.u_back)] = FAT
    bone = ((kind == _KIND_BODY) | (kind == _KIND_SACRUM)) & (q <= 1.0)
    out[bone] = MARROW
    rim = (q > 0.82) | (t < 1.2 * a) | ((kind == _KIND_BODY) & (seg_len - t < 1.2 * a))
    out[bone & rim] = CORTEX
    disc = (kind == _KIND_DISC) & (q <= 1.0)
    out[disc] = ANNULUS
    out[disc & (q < 0.4) & (np.abs(t - seg_len / 2) < 0.32 * seg_len)] = NUCLEUS

    # Thecal sac (CSF) with the lateral recesses, the cord above the conus and the nerve roots.
    # Below the upper sacrum the canal holds only fat.
    sac = s < anat.seg_start[-2] + 20 * a
    rf = 1.0 - _K_RECESS * np.where(w > 0, sev[3][k], sev[4][k]) * g
    ru, rw = cu - 0.18 * ap, 0.3 * cw
    recess = _inside((aw - rw, 0.2 * cw * rf), (u - ru, 0.28 * ap * rf))
    central = _inside((w, half_w), (u - cu, half_ap))
    # A narrowed recess is filled by hypertrophied facet and ligamentum flavum (dark).
    out[sac & _inside((aw - rw, 0.2 * cw), (u - ru, 0.28 * ap)) & (rf < 0.98)] = LIGAMENT
    out[sac & (central | recess)] = CSF
    out[sac & recess & _inside((aw - rw, 1.2 * a), (u - ru, 1.2 * a))] = NERVE
    taper_cord = np.sqrt(np.clip((np.float32(anat.conus_s) - s) / (15 * a), 0.0, 1.0))
    cord = central & _inside((w, 4.5 * a * taper_cord + 1e-3), (u - cu, 3.5 * a * taper_cord + 1e-3))
    roots = central & (s >= anat.conus_s) & _inside((w, 0.1 * cw), (u - cu - 0.15 * ap, 0.12 * ap))
    out[sac & (cord | roots)] = NERVE
    out[~sac & (central | recess)] = FAT
    return out, k.astype(np.int8)


def render(anat: Anatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray, sequence: str) -> np.ndarray:
    """Noise-free relative signal (float32, ~[0, 1]) of sequence ``"T1"`` or ``"T2"`` at patient points."""
    tissue, disc = tissue_map(anat, x, y, z)
    image = anat.signal[sequence].astype(np.float32)[tissue]
    if sequence == "T2":
        nucleus = tissue == NUCLEUS
        image[nucleus] = anat.nucleus_t2.astype(np.float32)[disc[nucleus]]
    return image


def finding_point(anat: Anatomy, condition: int, level: int) -> np.ndarray:
    """Patient point ``[3]`` where the finding of (condition index, level index) is read.

    Spinal: the canal centre at the disc; foraminal: the foramen centre on that side; subarticular:
    the lateral recess at the disc on that side (left = +x).
    """
    a, disc = anat.scale, float(anat.disc_s[_FIRST_GRADED + level])
    side = 1.0 if condition in (1, 3) else -1.0  # LABEL order: spinal, L/R foraminal, L/R subarticular
    if condition == 0:
        return to_patient(anat, disc, anat.canal_u, 0.0)
    if condition in (1, 2):
        return to_patient(anat, disc - 2.5 * a, anat.u_back + 5 * a, side * anat.foramen_w)
    return to_patient(anat, disc, anat.canal_u - 0.18 * anat.canal_ap, side * 0.3 * anat.canal_w)
