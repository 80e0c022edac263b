"""Imaging-plane geometry, view sampling and pretext metrics (transforms/planes.py), checked by hand."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_factory import write_series
from medsight import io
from medsight.errors import MedsightError
from medsight.scan import Scan
from medsight.transforms.planes import (
    Line,
    Plane,
    anatomical_frame,
    angle_error_deg,
    intersection_line,
    line_from_heatmap,
    line_heatmap,
    offset_error_px,
    pixel_to_world,
    planes_of_scan,
    position_error,
    pretext_errors,
    sample_plane,
    sample_views,
    stack_positions,
    views_from_dicom_study,
    world_to_pixel,
)


def _rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def test_axial_and_coronal_planes_of_identity_affine_cut_along_a_known_row():
    scan = Scan.from_spatial(np.zeros((10, 12, 8)))
    axial = planes_of_scan(scan, axis=2)[3]  # z = 3; columns follow x, rows follow y
    coronal = planes_of_scan(scan, axis=1)[5]  # y = 5; columns follow x, rows follow z
    assert axial.size == (12, 10) and coronal.size == (8, 10)
    in_axial = intersection_line(axial, coronal)
    # every point with y = 5 is row 5 of the axial image: the horizontal line row = 5
    assert abs(in_axial.direction[0]) < 1e-12 and abs(abs(in_axial.direction[1]) - 1) < 1e-12
    assert np.allclose(in_axial.distance([[5, 0], [5, 9]]), 0) and np.isclose(in_axial.distance([7, 2]), 2)
    theta, rho = in_axial.normal_form()
    assert np.isclose(theta, np.pi / 2) and np.isclose(rho, 5)
    # and z = 3 is row 3 of the coronal image
    in_coronal = intersection_line(coronal, axial)
    assert np.allclose(in_coronal.distance([[3, 0], [3, 7]]), 0)
    assert intersection_line(axial, planes_of_scan(scan, axis=2)[6]) is None  # parallel


def test_planes_of_scan_agree_with_scan_slice_plane():
    scan, _ = _ramp_scan()
    for axis in range(3):
        ours, theirs = planes_of_scan(scan, axis)[4], scan.slice_plane(4, axis)
        assert np.allclose(ours.origin, theirs.origin) and np.allclose(ours.normal, theirs.normal)
        assert np.allclose(ours.row_dir, theirs.u) and np.allclose(ours.col_dir, theirs.v)
        assert np.allclose(ours.spacing[::-1], theirs.spacing)
        assert np.allclose(pixel_to_world(ours, [3, 2]), theirs.world(2, 3))


def test_oblique_intersection_matches_brute_force_points_on_both_planes():
    rot_a, rot_b = _rotation(1), _rotation(2)
    a = Plane(np.array([3.0, -4.0, 7.0]), rot_a[:, 0], rot_a[:, 1], (0.7, 1.3), (40, 50))
    b = Plane(np.array([-2.0, 5.0, 1.0]), rot_b[:, 0], rot_b[:, 1], (1.1, 0.9), (60, 30))
    line_a, line_b = intersection_line(a, b), intersection_line(b, a)

    def signed_to(plane, xyz):
        return (xyz - plane.origin) @ np.cross(plane.row_dir, plane.col_dir)

    # for each row of a, the column where a's points reach plane b (distance is linear along a row)
    for r in np.linspace(-20, 60, 9):
        f0, f1 = signed_to(b, pixel_to_world(a, [r, 0.0])), signed_to(b, pixel_to_world(a, [r, 1.0]))
        c = -f0 / (f1 - f0)
        xyz = pixel_to_world(a, [r, c])
        assert abs(signed_to(b, xyz)) < 1e-6 and abs(signed_to(a, xyz)) < 1e-6
        assert line_a.distance([r, c]) < 1e-6
        assert line_b.distance(world_to_pixel(b, xyz)) < 1e-6


def test_normal_form_round_trip_and_convention():
    # the line x = col = 4 (vertical): theta = 0, rho = 4
    vertical = Line(np.array([0.0, 4.0]), np.array([1.0, 0.0]))
    assert np.allclose(vertical.normal_form(), (0.0, 4.0))
    line = Line(np.array([10.0, 10.0]), np.array([0.6, 0.8]))
    back = Line.from_normal_form(*line.normal_form())
    assert angle_error_deg(back, line) < 1e-9 and back.distance(line.point) < 1e-9


def test_pixel_world_round_trip_and_dicom_formula():
    rot = _rotation(3)
    plane = Plane(np.array([1.0, 2.0, 3.0]), rot[:, 0], rot[:, 1], (0.5, 2.0), (10, 20))
    # pixel (row 4, col 7): 7 columns of 2.0 mm along row_dir and 4 rows of 0.5 mm along col_dir
    expected = np.array([1.0, 2.0, 3.0]) + 7 * 2.0 * rot[:, 0] + 4 * 0.5 * rot[:, 1]
    assert np.allclose(pixel_to_world(plane, [4, 7]), expected)
    rc = np.random.default_rng(0).uniform(-5, 25, (13, 2))
    assert np.allclose(world_to_pixel(plane, pixel_to_world(plane, rc)), rc)


def test_stack_positions_are_normalised_along_the_normal():
    base = dict(row_dir=np.array([1.0, 0, 0]), col_dir=np.array([0, 1.0, 0]), spacing=(1.0, 1.0), size=(4, 4))
    # in-plane shifts must not matter, only the z positions 0, 2, 5, 10
    origins = [(0, 0, 5), (3, -1, 0), (9, 9, 10), (-2, 4, 2)]
    planes = [Plane(np.array(o, float), **base) for o in origins]
    assert np.allclose(stack_positions(planes), [0.5, 0.0, 1.0, 0.2])
    tilted = Plane(np.zeros(3), np.array([1.0, 0, 0]), np.array([0, 0.6, 0.8]), (1.0, 1.0), (4, 4))
    with pytest.raises(MedsightError):
        stack_positions([planes[0], tilted])


def _ramp_scan() -> tuple[Scan, callable]:
    def ramp(xyz):
        return 2.0 * xyz[..., 0] + 3.0 * xyz[..., 1] - xyz[..., 2] + 5.0

    affine = Scan.affine_from_spacing((1.5, 0.8, 2.0), origin=(-10, 4, 3), directions=_rotation(4))
    scan = Scan.from_spatial(np.zeros((30, 40, 20)), affine)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in scan.spatial_shape], indexing="ij"), axis=-1)
    return Scan.from_spatial(ramp(scan.voxel_to_world(ijk)).astype(np.float64), affine), ramp


def test_sampled_oblique_plane_equals_the_world_ramp():
    scan, ramp = _ramp_scan()
    centre = scan.voxel_to_world([15, 20, 10])
    rot = _rotation(5)
    plane = Plane.centred(centre, rot[:, 0], rot[:, 1], (0.9, 1.1), (12, 14))
    image = sample_plane(scan, plane)
    expected = ramp(pixel_to_world(plane, np.stack(np.mgrid[0:12, 0:14], axis=-1)))
    assert image.shape == (1, 12, 14)
    assert np.allclose(image[0], expected, atol=1e-3)  # trilinear interpolation is exact on a linear ramp


def test_planes_of_scan_sample_back_the_slices():
    scan, _ = _ramp_scan()
    for axis, k in ((2, 7), (0, 11)):
        plane = planes_of_scan(scan, axis)[k]
        index = [slice(None)] * 3
        index[axis] = k
        expected = scan.array[0][tuple(index)].T  # rows follow the higher remaining voxel axis
        assert np.allclose(sample_plane(scan, plane)[0], expected, atol=1e-6)


OBLIQUE_ROW = np.array([0.8, 0.6, 0.0])
OBLIQUE_COL = np.array([-0.36, 0.48, 0.8])


def test_dicom_tags_give_the_planes_of_the_converted_volume(tmp_path):
    volume = np.random.default_rng(0).integers(0, 1000, (5, 6, 7))
    write_series(tmp_path / "s", volume, OBLIQUE_ROW, OBLIQUE_COL, (0.5, 0.8), 2.0, (10.0, -20.0, 30.0))
    io.write(io.read(tmp_path / "s"), tmp_path / "s.nii.gz")
    converted = planes_of_scan(io.read(tmp_path / "s.nii.gz"), axis=2)
    headers = [pydicom.dcmread(str(f)) for f in sorted((tmp_path / "s").iterdir())]
    headers.sort(key=lambda h: int(h.InstanceNumber))
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    for k, h in enumerate(headers):
        tagged = Plane.from_dicom(h)
        assert tagged.size == (6, 7) and tagged.spacing == (0.5, 0.8)
        # DICOM: pixel (r, c) sits at IPP + c * PS[1] * IOP[:3] + r * PS[0] * IOP[3:] (LPS)
        lps = np.array(h.ImagePositionPatient, float) + 4 * 0.8 * OBLIQUE_ROW + 2 * 0.5 * OBLIQUE_COL
        assert np.allclose(pixel_to_world(tagged, [2, 4]), lps * lps_to_ras, atol=1e-4)
        plane = converted[k]
        assert plane.size == tagged.size and np.allclose(plane.spacing, tagged.spacing, atol=1e-5)
        for name in ("origin", "row_dir", "col_dir"):
            assert np.allclose(getattr(plane, name), getattr(tagged, name), atol=1e-4), name


def test_views_from_a_dicom_study_use_the_tags(tmp_path):
    rng = np.random.default_rng(1)
    frame = generate_uid()
    axial = (tmp_path / "axial", rng.integers(0, 500, (9, 16, 16)), (1, 0, 0), (0, 1, 0), (10.0, -20.0, 30.0))
    oblique = (
        tmp_path / "oblique",
        rng.integers(0, 500, (3, 12, 12)),
        OBLIQUE_ROW,
        OBLIQUE_COL,
        (11, -18, 37.5),
    )
    for folder, vol, row, col, origin in (axial, oblique):
        write_series(folder, vol, row, col, (1.0, 1.0), 2.0, origin, frame_of_reference_uid=frame)
    views = views_from_dicom_study([tmp_path / "oblique", tmp_path / "axial"], sigma_px=2.0)
    assert views.names == ["oblique"] and views.stack_images.shape == (9, 1, 16, 16)
    assert np.allclose(views.positions, np.linspace(0, 1, 9))
    # stack slice 0 holds the stored pixels of the axial file with the lowest position, transposed back
    assert np.array_equal(views.stack_images[0, 0], axial[1][0])
    assert views.heatmaps.shape == (9, 1, 16, 16)
    # the oblique central slice (k = 1) in LPS: normal n = row x col, through o = (11, -18, 37.5) + 2 n.
    # Pixel (r, c) of axial slice s is p = (10 + c, -20 + r, 30 + 2 s) (LPS); it lies on the oblique
    # slice when (p - o) . n = 0, a line n0 c + n1 r = const in the axial image.
    n = np.cross(OBLIQUE_ROW, OBLIQUE_COL)
    o = np.array([11.0, -18, 37.5]) + 2.0 * n
    s, r = 4, 5
    c = (o @ n - (10 * n[0] + (-20 + r) * n[1] + (30 + 2 * s) * n[2])) / n[0]
    assert 0 < c < 15
    for col in range(16):
        d = abs(n[0] * (col - c)) / np.hypot(n[0], n[1])  # pixel distance of (r, col) to that line
        assert np.isclose(views.heatmaps[s, 0, r, col], np.exp(-(d**2) / 8), atol=1e-4)
    # resampled at the native 1 mm on an 8 x 8 grid about each image centre (7.5, 7.5): the native
    # pixels 4..11 of every stack slice, with the same ridge, shifted by 4 pixels
    small = views_from_dicom_study([tmp_path / "oblique", tmp_path / "axial"], 2.0, spacing=1.0, size=(8, 8))
    assert small.stack_images.shape == (9, 1, 8, 8) and small.long_images[0].shape == (1, 8, 8)
    assert np.allclose(small.stack_images[0, 0], axial[1][0][4:12, 4:12], atol=1e-3)
    assert np.allclose(small.heatmaps[s, 0], views.heatmaps[s, 0, 4:12, 4:12], atol=1e-4)
    other = tmp_path / "other"
    write_series(
        other, rng.integers(0, 9, (2, 4, 4)), OBLIQUE_ROW, OBLIQUE_COL, frame_of_reference_uid="1.2.3"
    )
    with pytest.raises(MedsightError, match="FrameOfReferenceUID"):
        views_from_dicom_study([tmp_path / "axial", other])
    parallel = tmp_path / "parallel"
    write_series(parallel, rng.integers(0, 9, (2, 4, 4)), frame_of_reference_uid=frame)
    with pytest.raises(MedsightError, match="parallel"):
        views_from_dicom_study([tmp_path / "axial", parallel])


def test_heatmap_is_one_on_the_line_and_falls_as_a_gaussian():
    line = Line(np.array([10.0, 10.0]), np.array([0.6, 0.8]))
    heat = line_heatmap(line, (32, 32), sigma_px=2.0)
    assert np.isclose(heat[13, 14], 1.0) and np.isclose(heat[16, 18], 1.0)  # (10,10) + 5 and 10 steps
    assert np.isclose(heat[10, 15], np.exp(-9 / 8))  # (0, 5) from the point: 5 * 0.6 = 3 px off the line
    assert not line_heatmap(None, (4, 5), 2.0).any()


@pytest.mark.parametrize("theta_deg", [0.0, 17.0, 45.0, 90.0, 133.0, 179.0])
def test_line_from_heatmap_recovers_the_line(theta_deg):
    angle = np.deg2rad(theta_deg)
    true = Line(np.array([22.0, 25.0]), np.array([np.cos(angle), np.sin(angle)]))
    heat = line_heatmap(true, (48, 48), 2.0)
    heat += np.random.default_rng(0).uniform(0, 0.05, heat.shape).astype(np.float32)
    # a stray blob in the image corner farthest from the line
    r, c = max([(3, 3), (3, 44), (44, 3), (44, 44)], key=lambda rc: float(true.distance(rc)))
    heat[r - 1 : r + 2, c - 1 : c + 2] = heat.max()
    found = line_from_heatmap(heat)
    assert angle_error_deg(found, true) < 1.0
    assert offset_error_px(found, true, (48, 48)) < 0.5
    assert line_from_heatmap(np.zeros((8, 8))) is None


def test_metrics_by_hand():
    horizontal = Line(np.array([5.0, 0.0]), np.array([0.0, 1.0]))
    diagonal = Line(np.array([5.0, 5.0]), np.array([1.0, 1.0]) / np.sqrt(2))
    assert np.isclose(angle_error_deg(diagonal, horizontal), 45)
    assert np.isclose(angle_error_deg(Line(np.zeros(2), np.array([0.0, -1.0])), horizontal), 0)
    shifted = Line(np.array([8.0, 0.0]), np.array([0.0, 1.0]))
    # image 11 x 11: centre (5, 5) is on the true line; the prediction is 3 rows away
    assert np.isclose(offset_error_px(shifted, horizontal, (11, 11)), 3)
    assert np.isnan(angle_error_deg(None, horizontal))
    assert np.allclose(position_error([0.1, 0.5], [0.2, 0.5]), [0.1, 0.0])


def _ellipsoid_scan(flip: bool = False) -> Scan:
    """An ellipsoid with semi-axes 14, 8, 5 mm along a rotated frame, on a 1 mm grid."""
    rot = _rotation(6)
    shape = (40, 40, 40)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(float)
    local = (ijk - 19.5) @ rot
    inside = ((local / [14.0, 8.0, 5.0]) ** 2).sum(-1) <= 1
    image = np.where(inside, 100.0, 10.0) + np.random.default_rng(0).normal(0, 1, shape)
    affine = Scan.affine_from_spacing((1.0, 1.0, 1.0), origin=(-5, 3, 8))
    if flip:  # the same voxels stored reversed along i and j, the affine compensating
        image = image[::-1, ::-1]
        flipper = np.diag([-1.0, -1.0, 1.0, 1.0])
        flipper[:2, 3] = [shape[0] - 1, shape[1] - 1]
        affine = affine @ flipper
    return Scan.from_spatial(image, affine), rot


def test_anatomical_frame_finds_the_principal_axes_and_is_stable_under_flips():
    scan, rot = _ellipsoid_scan()
    frame = anatomical_frame(scan)
    for i in range(3):
        assert abs(frame.axes[i] @ rot[:, i]) > np.cos(np.deg2rad(3))
        assert frame.axes[i][np.argmax(np.abs(frame.axes[i]))] > 0
    assert np.allclose(frame.centre, np.array([-5, 3, 8]) + 19.5, atol=0.2)
    assert np.isclose(frame.extent[0, 1] - frame.extent[0, 0], 28, atol=1.5)
    flipped = anatomical_frame(_ellipsoid_scan(flip=True)[0])
    assert np.allclose(flipped.centre, frame.centre, atol=1e-6)
    assert np.allclose(flipped.axes, frame.axes, atol=1e-6)


def test_sampled_views_without_jitter_cut_the_stack_through_its_centre_at_right_angles():
    scan, rot = _ellipsoid_scan()
    views = sample_views(scan, np.random.default_rng(0), 5, 2, (32, 32), 1.0, 0.0, 0.0, 0.0, sigma_px=2.0)
    assert views.stack_images.shape == (5, 1, 32, 32) and views.heatmaps.shape == (5, 2, 32, 32)
    assert np.allclose(views.positions, np.linspace(0, 1, 5))
    assert abs(views.stack_planes[0].normal @ rot[:, 0]) > np.cos(np.deg2rad(3))
    for s in range(5):
        lines = [line_from_heatmap(views.heatmaps[s, k]) for k in range(2)]
        assert np.isclose(angle_error_deg(lines[0], lines[1]), 90, atol=1)
        centre_line = Line(np.array([15.5, 15.5]), lines[1].direction)  # through the image centre
        assert offset_error_px(lines[0], centre_line, (32, 32)) < 0.5
    # the stack images are the scan sampled on the stack planes
    assert np.allclose(views.stack_images[2], sample_plane(scan, views.stack_planes[2]))


def test_long_views_sit_on_the_anatomy_and_the_stack_carries_the_jitter():
    scan, _ = _ellipsoid_scan()
    frame = anatomical_frame(scan)
    for seed in range(3):
        views = sample_views(scan, np.random.default_rng(seed), 4, 2, (32, 32), 1.0, 10.0, 3.0, 30.0)
        for view in views.long_planes:  # each view contains the frame's long axis through its centre
            assert abs(view.normal @ frame.axes[0]) < 1e-9
            assert abs(view.normal @ (frame.centre - view.origin)) < 1e-9
        # no tilt or shift, only a roll of the slice grid: view 0 contains axes[0] and axes[2], so it
        # cuts every slice along axes[2], whose pixel direction is its projection on the slice's axes
        rolled = sample_views(scan, np.random.default_rng(seed), 3, 2, (32, 32), 1.0, 0.0, 0.0, 30.0)
        plane = rolled.stack_planes[1]
        w = frame.axes[2]  # (drow, dcol): rows advance along col_dir, columns along row_dir
        expected = Line(np.zeros(2), np.array([w @ plane.col_dir, w @ plane.row_dir]))
        assert angle_error_deg(line_from_heatmap(rolled.heatmaps[1, 0]), expected) < 1.0
    a, b = (sample_views(scan, np.random.default_rng(s), 3, 2, (32, 32), 1.0, 0.0, 0.0, 30.0) for s in (0, 1))
    assert angle_error_deg(line_from_heatmap(a.heatmaps[1, 0]), line_from_heatmap(b.heatmaps[1, 0])) > 1.0


def test_sampled_views_with_jitter_are_seeded_and_consistent():
    scan, _ = _ellipsoid_scan()
    a = sample_views(scan, np.random.default_rng(3), 4, 3, (24, 24), 1.5, 10.0, 2.0)
    b = sample_views(scan, np.random.default_rng(3), 4, 3, (24, 24), 1.5, 10.0, 2.0)
    assert np.array_equal(a.heatmaps, b.heatmaps) and np.array_equal(a.stack_images, b.stack_images)
    assert len(a.long_images) == 3 and a.long_images[0].shape == (1, 24, 24)
    for s in range(4):
        for k in range(3):
            true = intersection_line(a.stack_planes[s], a.long_planes[k])
            assert angle_error_deg(line_from_heatmap(a.heatmaps[s, k]), true) < 1.5  # a fit on 24 px


def test_a_named_long_axis_gives_the_world_frame():
    scan, _ = _ellipsoid_scan()
    frame = anatomical_frame(scan, long_axis="A")
    assert np.array_equal(frame.axes, np.eye(3)[[1, 0, 2]])
    pca = anatomical_frame(scan)
    assert np.allclose(frame.centre, pca.centre) and pca.sd[0] > pca.sd[1] > pca.sd[2]
    # the ellipsoid's semi-axis of 14 mm along axes[0]: sd of a uniform ellipsoid is a / sqrt(5)
    assert np.isclose(pca.sd[0], 14 / np.sqrt(5), rtol=0.05)
    with pytest.raises(MedsightError):
        anatomical_frame(scan, long_axis="X")


def test_world_cross_axes_keep_the_long_axis_and_take_the_rest_from_the_world():
    scan, rot = _ellipsoid_scan()
    pca = anatomical_frame(scan)
    frame = anatomical_frame(scan, cross_axes="world")
    assert np.allclose(frame.axes[0], pca.axes[0])
    assert np.allclose(frame.axes @ frame.axes.T, np.eye(3), atol=1e-12)
    # the first world axis that is not the long axis' own, minus its component along the long axis
    own = int(np.argmax(np.abs(pca.axes[0])))
    world = np.eye(3)[0 if own != 0 else 1]
    expected = world - (world @ pca.axes[0]) * pca.axes[0]
    assert np.allclose(frame.axes[1], expected / np.linalg.norm(expected))
    flipped = anatomical_frame(_ellipsoid_scan(flip=True)[0], cross_axes="world")
    assert np.allclose(flipped.axes, frame.axes, atol=1e-6)


def test_a_dicom_image_without_geometry_is_refused_in_one_line():
    ds = pydicom.Dataset()
    ds.Rows, ds.Columns = 4, 4
    with pytest.raises(MedsightError, match="plane geometry") as err:
        Plane.from_dicom(ds)
    assert "\n" not in str(err.value)


def test_pretext_errors_measure_against_the_exact_geometry():
    scan, _ = _ellipsoid_scan()
    views = sample_views(scan, np.random.default_rng(2), 4, 2, (32, 32), 1.0, 8.0, 2.0)
    perfect = pretext_errors(views.heatmaps, views.positions, views)
    assert perfect["angle_error_deg"] < 1 and perfect["offset_px"] < 0.3 and perfect["missed"] == 0
    assert perfect["position_error"] == 0
    # every predicted ridge moved 3 px along its normal, every position off by 0.1; one map flat
    shifted = np.zeros_like(views.heatmaps)
    for s, plane in enumerate(views.stack_planes):
        for k, view in enumerate(views.long_planes):
            true = intersection_line(plane, view)
            normal = np.array([-true.direction[1], true.direction[0]])
            shifted[s, k] = line_heatmap(Line(true.point + 3 * normal, true.direction), (32, 32), 2.0)
    shifted[0, 0] = 0
    errors = pretext_errors(shifted, np.clip(views.positions + 0.1, 0, 1.1), views)
    assert np.isclose(errors["offset_px"], 3, atol=0.3) and errors["angle_error_deg"] < 1
    assert errors["missed"] == 1 and np.isclose(errors["position_error"], 0.1)
    assert set(pretext_errors(None, views.positions, views)) == {"position_error"}
