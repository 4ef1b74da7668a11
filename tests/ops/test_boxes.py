"""lit_jax.ops.boxes against torch-op reimplementations of mmdet 2.11 bbox_overlaps / bbox2delta / delta2bbox."""
import jax
import jax.numpy as jnp
import numpy as np
import torch

from lit_jax.ops.boxes import box_iou, clip_boxes, decode_deltas, encode_deltas


# ---- independent references (torch ops, mmdet 2.11 arithmetic) ----
def ref_iou(b1, b2, eps=1e-6):
    b1, b2 = torch.as_tensor(b1), torch.as_tensor(b2)
    a1 = (b1[..., 2] - b1[..., 0]) * (b1[..., 3] - b1[..., 1])
    a2 = (b2[..., 2] - b2[..., 0]) * (b2[..., 3] - b2[..., 1])
    lt = torch.max(b1[..., :, None, :2], b2[..., None, :, :2])
    rb = torch.min(b1[..., :, None, 2:], b2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    ov = wh[..., 0] * wh[..., 1]
    union = torch.max(a1[..., None] + a2[..., None, :] - ov, torch.tensor([eps]))
    return (ov / union).numpy()


def ref_encode(p, g, means, stds):
    p, g = torch.as_tensor(p), torch.as_tensor(g)
    px = (p[..., 0] + p[..., 2]) * 0.5
    py = (p[..., 1] + p[..., 3]) * 0.5
    pw = p[..., 2] - p[..., 0]
    ph = p[..., 3] - p[..., 1]
    gx = (g[..., 0] + g[..., 2]) * 0.5
    gy = (g[..., 1] + g[..., 3]) * 0.5
    gw = g[..., 2] - g[..., 0]
    gh = g[..., 3] - g[..., 1]
    d = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], -1)
    return d.sub_(torch.tensor(means)[None]).div_(torch.tensor(stds)[None]).numpy()


def ref_decode(rois, deltas, means, stds, max_shape=None, clip=16 / 1000):
    rois, deltas = torch.as_tensor(rois), torch.as_tensor(deltas)
    reps = deltas.size(-1) // 4
    means = deltas.new_tensor(means).view(1, -1).repeat(1, reps)
    stds = deltas.new_tensor(stds).view(1, -1).repeat(1, reps)
    d = deltas * stds + means
    dx, dy, dw, dh = d[..., 0::4], d[..., 1::4], d[..., 2::4], d[..., 3::4]
    x1, y1, x2, y2 = rois[..., 0], rois[..., 1], rois[..., 2], rois[..., 3]
    px = ((x1 + x2) * 0.5).unsqueeze(-1).expand_as(dx)
    py = ((y1 + y2) * 0.5).unsqueeze(-1).expand_as(dy)
    pw = (x2 - x1).unsqueeze(-1).expand_as(dw)
    ph = (y2 - y1).unsqueeze(-1).expand_as(dh)
    dxw, dyh = pw * dx, ph * dy
    mr = np.abs(np.log(clip))
    dw = dw.clamp(min=-mr, max=mr)
    dh = dh.clamp(min=-mr, max=mr)
    gw, gh = pw * dw.exp(), ph * dh.exp()
    gx, gy = px + dxw, py + dyh
    b = torch.stack([gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5], -1).view(deltas.size())
    if max_shape is not None:
        ms = torch.tensor(max_shape, dtype=torch.float32)[..., :2]
        mx = torch.cat([ms] * reps * 2, -1).flip(-1).unsqueeze(-2)
        b = torch.where(b < 0, torch.tensor(0.0), b)
        b = torch.where(b > mx, mx, b)
    return b.numpy()


def rand_boxes(rng, n, w=200.0, h=120.0):
    xy = rng.uniform(-10, [w, h], size=(n, 2))
    wh = rng.uniform(0, 80, size=(n, 2))
    return np.concatenate([xy, xy + wh], -1).astype(np.float32)


def test_iou_random_and_edges():
    rng = np.random.default_rng(0)
    a, b = rand_boxes(rng, 37), rand_boxes(rng, 23)
    # edge cases: zero-area boxes, identical boxes, touching boxes, a box on the border
    a[0] = [5, 5, 5, 5]
    b[0] = [5, 5, 5, 5]
    a[1] = b[1] = [0, 0, 10, 10]
    a[2], b[2] = [0, 0, 10, 10], [10, 0, 20, 10]  # touching: IoU exactly 0
    a[3], b[3] = [0, 0, 10, 10], [5, 0, 15, 10]  # IoU 1/3
    got = np.asarray(box_iou(a, b))
    np.testing.assert_array_equal(got, ref_iou(a, b))  # same fp32 op order: bit-exact on CPU
    assert got[0, 0] == 0.0 and got[1, 1] == 1.0 and got[2, 2] == 0.0
    np.testing.assert_allclose(got[3, 3], 1 / 3, rtol=1e-6)
    # batched leading dims and the transpose identity
    ab = np.asarray(box_iou(a[None].repeat(2, 0), b[None].repeat(2, 0)))
    np.testing.assert_array_equal(ab[1], got)
    np.testing.assert_array_equal(np.asarray(box_iou(b, a)), got.T)


def test_encode_decode_against_reference():
    rng = np.random.default_rng(1)
    p = rand_boxes(rng, 50) + np.float32([0, 0, 1, 1])
    g = rand_boxes(rng, 50) + np.float32([0, 0, 1, 1])
    for means, stds in [((0.0,) * 4, (1.0,) * 4), ((0.0,) * 4, (0.1, 0.1, 0.2, 0.2))]:
        e = np.asarray(jax.jit(lambda x, y: encode_deltas(x, y, means, stds))(p, g))
        np.testing.assert_allclose(e, ref_encode(p, g, means, stds), rtol=1e-6, atol=1e-6)
        back = np.asarray(decode_deltas(p, e, means, stds))
        np.testing.assert_allclose(back, g, rtol=1e-5, atol=1e-3)

    d = rng.normal(0, 2, size=(50, 4)).astype(np.float32)
    d[0] = [0.3, -0.2, 10.0, -10.0]  # dw / dh clamped to +-log(1/0.016); dx / dy not
    d[1] = [25.0, -30.0, 0.0, 0.0]
    p[1] = [10, 10, 50, 50]
    for shape in [None, (120, 200), (120, 200, 3)]:
        got = np.asarray(jax.jit(lambda a, x: decode_deltas(a, x, max_shape=shape))(p, d))
        np.testing.assert_allclose(got, ref_decode(p, d, (0.0,) * 4, (1.0,) * 4, shape), rtol=1e-6, atol=1e-4)
    w0 = p[0, 2] - p[0, 0]
    got = np.asarray(decode_deltas(p[:1], d[:1]))[0]
    np.testing.assert_allclose(got[2] - got[0], w0 * np.exp(4.135166556742356), rtol=1e-5)
    got = np.asarray(decode_deltas(p[1:2], d[1:2], max_shape=(120, 200)))[0]
    assert got[0] == 200.0 and got[2] == 200.0 and got[1] == 0.0 and got[3] == 0.0  # pushed out, clipped


def test_decode_class_specific_and_traced_shape():
    rng = np.random.default_rng(2)
    rois = rand_boxes(rng, 8) + np.float32([0, 0, 1, 1])
    d = rng.normal(0, 1, size=(8, 3 * 4)).astype(np.float32)
    stds = (0.1, 0.1, 0.2, 0.2)
    want = ref_decode(rois, d, (0.0,) * 4, stds, (100, 150))
    got = jax.jit(lambda r, x, hw: decode_deltas(r, x, stds=stds, max_shape=hw))(rois, d, jnp.array([100, 150]))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-4)
    # per-image shapes (B, 2) for (B, N, 4K) inputs, non-square canvases
    hw = np.array([[100, 150], [60, 40]])
    got = np.asarray(decode_deltas(np.stack([rois, rois]), np.stack([d, d]), stds=stds, max_shape=hw))
    for i in range(2):
        np.testing.assert_allclose(got[i], ref_decode(rois, d, (0.0,) * 4, stds, tuple(hw[i])), rtol=1e-6, atol=1e-4)
    # vmap with a traced per-image shape
    got = jax.vmap(lambda r, x, s: decode_deltas(r, x, stds=stds, max_shape=s))(
        jnp.stack([rois, rois]), jnp.stack([d, d]), jnp.asarray(hw))
    np.testing.assert_allclose(np.asarray(got)[1], ref_decode(rois, d, (0.0,) * 4, stds, (60, 40)), rtol=1e-6, atol=1e-4)


def test_clip_boxes():
    b = np.float32([[-5, -1, 300, 50], [10, 20, 30, 40], [0, 0, 200, 120]])
    got = np.asarray(clip_boxes(b, (120, 200)))
    np.testing.assert_array_equal(got, [[0, 0, 200, 50], [10, 20, 30, 40], [0, 0, 200, 120]])
    got = np.asarray(jax.jit(clip_boxes)(b, jnp.array([40, 25])))
    np.testing.assert_array_equal(got, [[0, 0, 25, 40], [10, 20, 25, 40], [0, 0, 25, 40]])
