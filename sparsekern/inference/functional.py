"""The layers of the inference modules on top of the spmm ops (``sparsekern.ops.spmm``).

* :func:`sparse_linear` / :func:`sparse_conv1x1`: ``F.linear`` / a 1×1 ``F.conv2d`` given one of
  the matmul ops with its weight bound (``mm(x [in, n], transpose_out)``); a 1×1 conv runs groups
  of images (:func:`conv_group`) side by side in one call.
* :func:`csr_conv2d` / :func:`ck_conv2d`: a KxK convolution (groups 1, zero padding) by direct
  sparse convolution (``csr_conv`` / ``ck_conv``): groups of images are copied into a zero-padded
  buffer of stride phases (:func:`conv_geometry`) and convolved at stride 1 over the phases.
* :func:`conv2d`: the modules' KxK convolution, with a cache of offsets / taps and input buffers
  per weight, input size and thread (:func:`direct_conv_cache`); under torch.compile one opaque op
  ``sparsekern::<fmt>_conv2d``.
"""
import ctypes
import math
import os
import sys
import threading

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..ops._common import define
from ..ops.spmm import ck_conv, csr_conv


#: Outputs of at least this many bytes get transparent huge pages (:func:`new_output`).
HUGE_PAGE_MIN_BYTES = 8 << 20
_HUGE, _MADV_HUGEPAGE = 2 << 20, 14


def _libc():
    """The C library (``madvise``, ``mallopt``): None off Linux or where it cannot be loaded."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_C_LIBRARY = _libc()
#: The C library for huge-page advice: None with ``SPARSEKERN_HUGE_PAGES=0`` (plain allocations).
_LIBC = None if os.environ.get("SPARSEKERN_HUGE_PAGES") == "0" else _C_LIBRARY
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
#: glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): larger blocks are always mapped.
MMAP_THRESHOLD_MAX = 32 << 20


def _glibc():
    """The C library if it is glibc (``mallopt``'s parameters below are glibc's), else None."""
    try:
        is_glibc = bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (AttributeError, ValueError, OSError):
        is_glibc = False
    return _C_LIBRARY if is_glibc else None


def retain_freed_memory(trim_threshold_mb=256):
    """Keep the memory of freed tensors in the process's heap instead of handing it back to the OS,
    so that the next forward reuses it without page faults. Process-wide (glibc ``mallopt``): blocks
    up to :data:`MMAP_THRESHOLD_MAX` come from the heap (``M_MMAP_THRESHOLD``), and the heap shrinks
    only when more than ``trim_threshold_mb`` MB are free at its top (``M_TRIM_THRESHOLD``). glibc's
    default adapts both to the blocks freed so far; a process that runs only a converted model at
    batch 1 can end up trimming the heap under its activations and faulting them back in on every
    forward (ResNet-50, STR 90 %, batch 1, AMD EPYC Zen 3 VM: 2,300–2,800 faults and 7.5–9 ms of
    system time per forward, 24–35 ms; after this call 0 faults, 21–27 ms). Larger blocks (batch-32
    activations) stay mapped per allocation: :func:`new_output`'s cache and huge pages cover those.
    The cost: the process's memory stays at its peak. Returns True once set, False where the C
    library is not glibc (nothing changed)."""
    if isinstance(trim_threshold_mb, bool) or not isinstance(trim_threshold_mb, (int, float)) or not (
            0 <= trim_threshold_mb < 2048):
        raise ValueError(f"retain_freed_memory: trim_threshold_mb must be a number of megabytes in [0, 2048) "
                         f"(mallopt takes an int), got {trim_threshold_mb!r}")
    libc = _glibc()
    if libc is None:
        return False
    for param, value in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (_M_TRIM_THRESHOLD, int(trim_threshold_mb * (1 << 20)))):
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:
            raise RuntimeError(f"retain_freed_memory: mallopt({param}, {value}) failed")
    return True


def _fresh_output(like, shape):
    """``like.new_empty(shape)``; at least :data:`HUGE_PAGE_MIN_BYTES` (CPU, Linux): transparent huge
    pages asked for on its 2 MB-aligned interior (``madvise MADV_HUGEPAGE``) before anything writes
    it: fresh memory costs a page fault per 4 KB page at first touch, and a batch-32 ResNet-50
    layer's 100 MB output took ~25K of them, about as long as the sparse layer (AMD EPYC). The C++
    kernels' outputs follow the same policy (``csrc/cpu/common.h`` ``empty_output``);
    ``SPARSEKERN_HUGE_PAGES=0`` turns both off."""
    out = like.new_empty(shape)
    nbytes = out.numel() * out.element_size()
    if _LIBC is not None and nbytes >= HUGE_PAGE_MIN_BYTES and out.device.type == "cpu":
        p = out.data_ptr()
        a, e = -(-p // _HUGE) * _HUGE, (p + nbytes) // _HUGE * _HUGE
        if e > a:
            _LIBC.madvise(ctypes.c_void_p(a), ctypes.c_size_t(e - a), _MADV_HUGEPAGE)  # advice only
    return out


def _output_cache_bytes():
    """``SPARSEKERN_OUTPUT_CACHE_MB`` (0: off), else 2 GB or an eighth of the machine's memory if less."""
    env = os.environ.get("SPARSEKERN_OUTPUT_CACHE_MB")
    if env is not None:
        try:
            mb = float(env)
        except ValueError:
            mb = -1.0
        if not mb >= 0:
            raise ValueError(f"SPARSEKERN_OUTPUT_CACHE_MB must be a number of megabytes >= 0, got {env!r}")
        return int(mb * (1 << 20))
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        ram = 16 << 30
    return min(2 << 30, ram // 8)


#: Bytes of large layer outputs (:func:`new_output`) kept for reuse once their users drop them.
OUTPUT_CACHE_BYTES = _output_cache_bytes()
#: Outputs of at least this many bytes go through the cache.
OUTPUT_CACHE_MIN_BYTES = HUGE_PAGE_MIN_BYTES


#: The storage use count of a tensor nothing else references, as read: the tensor + the call's storage object.
_ALONE = 2


def _use_count_probe():
    """torch's storage use count (private API, ``torch._C._storage_Use_Count``) if it counts as the
    cache expects (a tensor alone: :data:`_ALONE`; with a view, one more), else None: no cache (it
    would never find a buffer free, only hold memory)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return None
    try:
        t = torch.empty(1)
        alone = count(t.untyped_storage()._cdata)
        v = t[:]
        viewed = count(t.untyped_storage()._cdata)
        del v
        return count if (alone, viewed) == (_ALONE, _ALONE + 1) and count(t.untyped_storage()._cdata) == _ALONE else None
    except Exception:  # noqa: BLE001 (a private API: any failure means no cache)
        return None


_storage_use_count = _use_count_probe()


class _OutputCache:
    """Large CPU layer outputs for reuse: memory the process wrote before costs no page faults
    (fresh memory does, at first touch: ~0.5 ms per 3 MB on the Intel Xeon VM, a batch-32 ResNet-50
    allocates ~1 GB of outputs per forward). A buffer is handed out again only when nothing but the
    cache references its storage (no tensor, view or saved tensor of the last user left); at most
    :data:`OUTPUT_CACHE_BYTES`, least recently used free buffers evicted first."""

    def __init__(self):
        self.lock = threading.Lock()
        self.buffers = []  # [(key, flat tensor)], least recently used first
        self.nbytes = 0

    @staticmethod
    def _free(t):
        return _storage_use_count(t.untyped_storage()._cdata) == _ALONE

    def take(self, like, shape, numel):
        """A buffer of ``numel`` elements viewed as ``shape``, or None (no room in the cache)."""
        key, nbytes = (numel, like.dtype, like.device), numel * like.element_size()
        with self.lock:
            free = [i for i, (_, t) in enumerate(self.buffers) if self._free(t)]
            match = next((i for i in free if self.buffers[i][0] == key), None)
            if match is not None:
                self.buffers.append(self.buffers.pop(match))
                return self.buffers[-1][1].view(shape)
            evict = set()
            for i in free:  # least recently used first
                if self.nbytes + nbytes <= OUTPUT_CACHE_BYTES:
                    break
                evict.add(i)
                self.nbytes -= self.buffers[i][1].nbytes
            self.buffers = [b for i, b in enumerate(self.buffers) if i not in evict]
            if self.nbytes + nbytes > OUTPUT_CACHE_BYTES:
                return None
            with torch.inference_mode(False):  # a normal tensor: reusable in and out of inference mode
                t = _fresh_output(like, (numel,))
            self.buffers.append((key, t))
            self.nbytes += nbytes
            return t.view(shape)

    def clear(self):
        """Drop every buffer (those still in use stay with their users); returns the bytes dropped."""
        with self.lock:
            n, self.buffers, self.nbytes = self.nbytes, [], 0
            return n


_OUTPUTS = _OutputCache()


def empty_output_cache():
    """Release the layer outputs :func:`new_output` keeps for reuse (like ``torch.cuda.empty_cache``);
    returns the bytes the cache held."""
    return _OUTPUTS.clear()


def new_output(like, *shape):
    """``like.new_empty(shape)`` for a layer's output (uninitialized). A CPU one of at least
    :data:`OUTPUT_CACHE_MIN_BYTES` comes from the output cache (:class:`_OutputCache`: a freed
    earlier output's memory, no page faults; :func:`empty_output_cache` releases it), else fresh
    (:func:`_fresh_output`: on huge pages)."""
    if torch.compiler.is_compiling():
        return like.new_empty(shape)
    numel = math.prod(shape)
    if (like.device.type == "cpu" and _storage_use_count is not None
            and like.element_size() * numel >= OUTPUT_CACHE_MIN_BYTES):
        out = _OUTPUTS.take(like, shape, numel)
        if out is not None:
            return out
    return _fresh_output(like, shape)


def fits(residual, shape, like):
    """Whether ``residual`` can be fused into a kernel's store for an output ``shape`` like ``like``
    (same shape, dtype and device)."""
    return tuple(residual.shape) == tuple(shape) and residual.dtype == like.dtype and residual.device == like.device


def add_act(y, residual, relu):
    """The epilogue unfused: ``y + residual`` (broadcast as ``+``), then ``max(·, 0)`` if ``relu``."""
    y = y + residual
    return y.relu_() if relu else y


def epilogue_(y, relu, residual):
    """The kernels' store epilogue after the fact, in place on a kernel's fresh output ``y``: ``y +=
    residual`` (``y``'s shape), then ``max(·, 0)`` if ``relu`` — the values :func:`add_act` gives,
    without a second tensor (the ops without an epilogue, ``bsr_mm`` / ``nm_mm``, and a batched
    1×1 conv's groups whose output is not in the residual's layout)."""
    if residual is not None:
        y.add_(residual)
    return y.relu_() if relu else y


def _call(mm, xt, transpose_out, relu, residual):
    """``mm(xt, transpose_out)`` with the epilogue arguments only when set (a bare op bound to its
    weight takes none)."""
    if relu or residual is not None:
        return mm(xt, transpose_out, relu, residual)
    return mm(xt, transpose_out)


def sparse_linear(x, mm, out_features, relu=False, residual=None):
    """``x·Wᵀ + b`` (``F.linear``) given ``mm(xt [in, n], transpose_out[, relu, residual]) -> W·xt +
    b`` (one of the raw ops with its weight bound): ``x [..., in]`` → ``[..., out]``. Batch > 1
    passes the view ``xᵀ [in, B]`` (the op makes it contiguous: ``csr_mm`` by a blocked transpose).
    ``relu`` / ``residual``: ``max(y + residual, 0)``, in the kernel's store when ``residual`` has
    the output's shape (:func:`fits`), else :func:`add_act` after it."""
    in_features = x.shape[-1]
    shape = (*x.shape[:-1], out_features)
    xt = x.reshape(in_features, 1) if x.numel() == in_features and in_features else x.reshape(-1, in_features).t()
    if residual is None or fits(residual, shape, x):
        r = None if residual is None else residual.reshape(-1, out_features)
        return _call(mm, xt, True, relu, r).view(shape)
    return add_act(_call(mm, xt, True, False, None).view(shape), residual, relu)


#: Input bytes one batched conv call reads (direct KxK and 1×1): a group's input is still in L2
#: (from its copy) when the kernel reads it. Whole batches of 256 16×16×64 images in one call
#: (21 MB) ran 1.5× slower than groups of 16 (AMD EPYC, bench/results/spmm-formats-amd-epyc.md).
CONV_GROUP_BYTES = 1 << 20


def conv_group(n_img, image_bytes):
    """Images per kernel call of :func:`sparse_conv1x1`, :func:`csr_conv2d` and :func:`ck_conv2d`
    for a batch of ``n_img`` images of ``image_bytes`` input bytes each (zero-padded phases for a
    KxK conv): as many as fit :data:`CONV_GROUP_BYTES` (at least one), as equal groups."""
    calls = -(-n_img // max(1, CONV_GROUP_BYTES // max(1, image_bytes)))
    return -(-n_img // calls) if n_img else 1


def sparse_conv1x1(x, mm, out_features, stride=1, relu=False, residual=None):
    """1×1 convolution (padding 0, groups 1) given ``mm`` as in :func:`sparse_linear`:
    ``x [N, in, H, W]`` → ``[N, out, H', W']``: one call ``W·[x[i] … x[i+g-1]]`` per group of
    ``g`` images (:func:`conv_group`: as many as fit :data:`CONV_GROUP_BYTES`, so the input a
    call reads stays in cache), their ``g·H'·W'`` pixels side by side. ``relu`` / ``residual`` as
    :func:`sparse_linear`'s: in the kernel's store for groups of one image (the residual's image
    is then in the kernel's layout), else added in place to each group's output while it is still
    in cache (no second output-sized tensor: at batch 32 a fresh 100 MB tensor costs more page
    faults than the add)."""
    if stride != 1:
        x = x[:, :, ::stride, ::stride]
    n, c, h, w = x.shape
    if n <= 1:
        xr = x.reshape(c, n * h * w)
        if residual is None or fits(residual, (n, out_features, h, w), x):
            r = None if residual is None else residual.reshape(out_features, n * h * w)
            return _call(mm, xr, False, relu, r).view(n, out_features, h, w)
        return add_act(_call(mm, xr, False, False, None).view(n, out_features, h, w), residual, relu)
    g = conv_group(n, c * h * w * x.element_size())
    res = residual is not None and fits(residual, (n, out_features, h, w), x)
    out = new_output(x, n, out_features, h, w)
    for i in range(0, n, g):
        xi, oi = x[i:i + g], out[i:i + g]
        xr = xi.transpose(0, 1).reshape(c, xi.shape[0] * h * w)
        if res and g == 1:
            oi.copy_(_call(mm, xr, False, relu, residual[i].reshape(out_features, h * w)).view(oi.shape))
            continue
        oi.copy_(_call(mm, xr, False, relu and residual is None, None).view(out_features, xi.shape[0], h, w).transpose(0, 1))
        if res:
            epilogue_(oi, relu, residual[i:i + g])
    return add_act(out, residual, relu) if residual is not None and not res else out


# --- direct KxK convolution -----------------------------------------------------------------------

#: Input channels per reduction slab of ``csr_conv`` / ``ck_conv`` (their rows of a column tile stay
#: in cache while a block of output rows reads them). 64 rather than 32: fewer, longer visits of each
#: row's nonzeros (ResNet-50's 3×3 convs at 90 %, batch 1, 2 threads, AMD EPYC: 64→64 56×56 0.64 →
#: 0.50 ms, 512→512 7×7 0.69 → 0.66 ms, 28×28 and 14×14 unchanged; the converted model ~2 % faster).
SLAB_CHANNELS = 64


def conv_geometry(h, w, kernel_size, stride, padding, dilation):
    """The direct convolution's layout for an ``h×w`` input: ``(hq, wq, h_out, w_out)``. The
    zero-padded image ``[C, Hp, Wp]`` is stored as stride phases ``[C, sh, sw, hq, wq]``
    (phase ``(a, b)`` holds padded pixels ``(a + sh·i, b + sw·j)``; ``hq = ⌈Hp/sh⌉``), so a
    strided convolution is a stride-1 one over the phases; outputs are wide rows of ``wq``."""
    (r_, s_), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    hp, wp = h + 2 * ph, w + 2 * pw
    h_out, w_out = (hp - dh * (r_ - 1) - 1) // sh + 1, (wp - dw * (s_ - 1) - 1) // sw + 1
    if hp - dh * (r_ - 1) <= 0 or wp - dw * (s_ - 1) <= 0:
        raise ValueError(f"conv2d: input {h}×{w} (padded {hp}×{wp}) is smaller than the dilated kernel")
    return -(-hp // sh), -(-wp // sw), h_out, w_out


def conv_taps(kernel_size, stride, dilation, hq, wq):
    """Offsets (int32 ``[R·S]``) of a kernel's taps within one channel's phases
    ``[sh, sw, hq, wq]`` (:func:`conv_geometry`): tap ``(r, s)`` reads phase
    ``(r·dil_h mod sh, s·dil_w mod sw)`` shifted by ``(r·dil_h div sh, s·dil_w div sw)`` (the CK
    format's ``taps``; stride 1: ``r·dil_h·wq + s·dil_w``)."""
    (sh, sw), (dh, dw) = stride, dilation
    r = torch.arange(kernel_size[0])[:, None] * dh
    s = torch.arange(kernel_size[1])[None, :] * dw
    off = ((r % sh) * sw + s % sw) * (hq * wq) + (r // sh) * wq + s // sw
    return off.reshape(-1).to(torch.int32)


def _check_int32(fn, channels, stride, hq, wq):
    """The size of one channel's phases ``sh·sw·hq·wq``, ValueError unless ``channels`` of them
    have int32 offsets."""
    plane = stride[0] * stride[1] * hq * wq
    if channels * plane >= 2 ** 31:
        raise ValueError(f"{fn}: an input of {channels} channels of {hq}×{wq} pixels per phase is "
                         "too large for int32 offsets")
    return plane


def conv_offsets(col, kernel_size, stride, dilation, channels, hq, wq):
    """Flat input offsets (int32 ``[nnz]``) of the nonzeros of a CSR conv weight ``[out, C·R·S]``
    in the phase layout ``[C, sh, sw, hq, wq]`` of :func:`conv_geometry`: ``c·plane + taps[r·S + s]``."""
    plane = _check_int32("conv2d", channels, stride, hq, wq)
    col = col.long()
    rs = kernel_size[0] * kernel_size[1]
    taps = conv_taps(kernel_size, stride, dilation, hq, wq).long()
    return ((col // rs) * plane + taps[col % rs]).to(torch.int32)


def _phase_plan(shape, scratch, geometry, stride, padding):
    """``(destination, rows, cols)`` per stride phase: copying ``x[:, :, rows, cols]`` (slices)
    of a batch ``x`` of ``shape [N, C, H, W]``, channels first, into ``destination`` (a view of
    ``scratch`` ``[C, sh, sw, N·hq, wq]``, :func:`conv_geometry`, images stacked in each phase) fills
    the phases; the rest of ``scratch`` stays zero. Built once per buffer (the views are reused)."""
    hq, wq = geometry[:2]
    (sh, sw), (ph, pw) = stride, padding
    n_img, c, h, w = shape
    ph6 = scratch[:c * sh * sw * n_img * hq * wq].view(c, sh, sw, n_img, hq, wq)

    def span(a, step, pad, size):  # first phase index, count, first source index
        i0 = max(0, -(-(pad - a) // step))
        i1 = (pad + size - 1 - a) // step
        return i0, i1 - i0 + 1, a + step * i0 - pad

    plan = []
    for a in range(sh):
        i0, ni, r0 = span(a, sh, ph, h)
        for b in range(sw):
            j0, nj, c0 = span(b, sw, pw, w)
            if ni > 0 and nj > 0:
                plan.append((ph6[:, a, b, :, i0:i0 + ni, j0:j0 + nj],
                             slice(r0, r0 + sh * (ni - 1) + 1, sh), slice(c0, c0 + sw * (nj - 1) + 1, sw)))
    return plan


def _direct_conv2d(x, run, index, out_features, kernel_size, stride, padding, dilation, cache, relu=False,
                   residual=None):
    """The batch loop of :func:`csr_conv2d` / :func:`ck_conv2d`: groups of ``g`` images
    (:func:`conv_group`) stacked in one zero-padded tall image of stride phases ``[C, sh, sw,
    g·hq, wq]`` (image ``i`` holds phase rows ``i·hq ..``), each group one kernel call
    ``run(buf, idx, g·hq, n, wq, w_out, relu, residual) -> [out, n / wq, w_out]`` over ``n = ((g-1)·hq +
    h_out)·wq`` wide pixels (the ``hq - h_out`` rows between two images' outputs are computed and
    dropped). ``relu`` / ``residual``: ``max(y + residual, 0)``, in the kernel's store for one image
    and a residual of the output's shape (:func:`fits`), else :func:`add_act` after it.
    ``cache`` maps ``g`` to ``(idx, buf, plan)``: ``idx = index(g·hq, wq)`` (offsets or taps), the
    buffer, whose padding stays zero, and its :func:`_phase_plan`."""
    n_img, c, h, w = x.shape
    (sh, sw), size_of = stride, x.element_size()
    hq, wq, h_out, w_out = conv_geometry(h, w, kernel_size, stride, padding, dilation)
    if residual is not None and (n_img != 1 or not fits(residual, (1, out_features, h_out, w_out), x)):
        y = _direct_conv2d(x, run, index, out_features, kernel_size, stride, padding, dilation, cache)
        return add_act(y, residual, relu)
    if n_img == 0:
        return x.new_empty(0, out_features, h_out, w_out)
    r = None if residual is None else residual.reshape(out_features, h_out, w_out)
    g = conv_group(n_img, c * sh * sw * hq * wq * size_of)
    out = None if g >= n_img else new_output(x, n_img, out_features, h_out, w_out)  # None: one call
    for i in range(0, n_img, g):
        xi = x[i:i + g]
        gi = xi.shape[0]
        if gi not in cache:  # slack: the last wide row reads past the image, and 15 more zeros
            # let the kernel run its last columns as a whole 16-float vector
            buf = x.new_zeros(c * sh * sw * gi * hq * wq + (dilation[1] * (kernel_size[1] - 1)) // sw + 15)
            cache[gi] = (index(gi * hq, wq), buf, _phase_plan(xi.shape, buf, (hq, wq), stride, padding))
        idx, buf, plan = cache[gi]
        for dst, rows, cols in plan:
            dst.copy_(xi[:, :, rows, cols].transpose(0, 1))
        y = run(buf, idx, gi * hq, ((gi - 1) * hq + h_out) * wq, wq, w_out, relu, r)  # [out, rows, w_out]
        y = y.unfold(1, h_out, hq).permute(1, 0, 3, 2)  # [gi, out, h_out, w_out]: image j at rows j·hq..
        if out is None:
            return y.contiguous()
        out[i:i + gi] = y
    return out


def _bias(bias, val):
    return bias if bias is not None else val.new_empty(0)


def csr_conv2d(x, rowptr, col, val, bias, out_features, kernel_size, stride, padding, dilation, cache=None,
               relu=False, residual=None):
    """KxK convolution (groups 1, zero padding) with a CSR weight ``[out, C·R·S]``:
    ``x [N, C, H, W]`` → ``[N, out, H', W']`` (``F.conv2d`` shapes). Groups of images are
    copied into a zero-padded buffer of stride phases (:func:`conv_geometry`, images stacked as in
    :func:`_direct_conv2d`) and convolved directly, one ``csr_conv`` call per group, at stride 1
    over the phases, in wide rows: only the strided outputs are computed. ``cache``: a dict kept
    by the caller for this input's ``(C, H, W)`` (and thread): the :func:`conv_offsets` and
    buffers per group size, reused by later calls. ``relu`` / ``residual``: ``max(y + residual, 0)``
    (:func:`_direct_conv2d`)."""
    b = _bias(bias, val)

    def index(hq, wq):
        return conv_offsets(col, kernel_size, stride, dilation, x.shape[1], hq, wq)

    def run(buf, offsets, hq, n, wq, w_out, relu, residual):
        slab = SLAB_CHANNELS * stride[0] * stride[1] * hq * wq
        return csr_conv(rowptr, offsets, val, b, buf, n, out_features, slab, wq, w_out, relu=relu, residual=residual)

    return _direct_conv2d(x, run, index, out_features, kernel_size, stride, padding, dilation,
                          {} if cache is None else cache, relu, residual)


def ck_conv2d(x, rowptr, chan, val, bias, out_features, kernel_size, stride, padding, dilation, cache=None,
              relu=False, residual=None):
    """:func:`csr_conv2d` with a CK weight (``formats.ck_from_dense``): ``x [N, C, H, W]`` →
    ``[N, out, H', W']``; ``cache`` holds :func:`conv_taps` and buffers per group size; ``relu`` /
    ``residual`` as :func:`csr_conv2d`'s."""
    b = _bias(bias, val)

    def index(hq, wq):
        _check_int32("ck_conv2d", x.shape[1], stride, hq, wq)
        return conv_taps(kernel_size, stride, dilation, hq, wq)

    def run(buf, taps, hq, n, wq, w_out, relu, residual):
        plane = stride[0] * stride[1] * hq * wq
        return ck_conv(rowptr, chan, val, taps, b, buf, n, out_features, plane, SLAB_CHANNELS, wq, w_out, relu=relu,
                       residual=residual)

    return _direct_conv2d(x, run, index, out_features, kernel_size, stride, padding, dilation,
                          {} if cache is None else cache, relu, residual)


# --- the inference modules' KxK convolution --------------------------------------------------------

_DIRECT_CACHES = WeakIdKeyDictionary()  # a weight's val -> {(thread, dtype, device, C, H, W): cache}


def direct_conv_cache(val, x):
    """The :func:`csr_conv2d` / :func:`ck_conv2d` cache of the weight whose values are ``val``
    for inputs shaped like ``x``, per thread (each call writes its buffers). It lives as long as
    ``val``: a new weight tensor (``.to()``, ``load_state_dict``) starts empty."""
    per = _DIRECT_CACHES.get(val)
    if per is None:
        per = _DIRECT_CACHES[val] = {}
    return per.setdefault((threading.get_ident(), x.dtype, x.device) + tuple(x.shape[1:]), {})


_CONV2D = {"csr": csr_conv2d, "ck": ck_conv2d}


def _fake_conv2d(x, rowptr, idx, val, bias, out_features, kernel_size, stride, padding, dilation, relu=False,
                 residual=None):
    h_out, w_out = conv_geometry(x.shape[2], x.shape[3], kernel_size, stride, padding, dilation)[2:]
    y = x.new_empty(x.shape[0], out_features, h_out, w_out)
    if residual is None:
        return y
    return y.new_empty(torch.broadcast_shapes(y.shape, residual.shape), dtype=torch.result_type(y, residual))


def _conv2d_op(fmt):
    def impl(x, rowptr, idx, val, bias, out_features, kernel_size, stride, padding, dilation, relu=False,
             residual=None):
        geometry = tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation)
        return _CONV2D[fmt](x, rowptr, idx, val, bias, out_features, *geometry, direct_conv_cache(val, x), relu,
                            residual)

    return define(f"{fmt}_conv2d(Tensor x, Tensor rowptr, Tensor idx, Tensor val, Tensor? bias, SymInt out_features, "
                  "SymInt[] kernel_size, SymInt[] stride, SymInt[] padding, SymInt[] dilation, bool relu=False, "
                  "Tensor? residual=None) -> Tensor",
                  "inference", reference=impl, fake=_fake_conv2d)


_CONV2D_OPS = {fmt: _conv2d_op(fmt) for fmt in _CONV2D}


def conv2d(fmt, x, rowptr, idx, val, bias, out_features, kernel_size, stride, padding, dilation, relu=False,
           residual=None):
    """The KxK convolution of the inference modules, weight in format ``fmt``: ``"csr"``
    (:func:`csr_conv2d`, ``idx = col``) or ``"ck"`` (:func:`ck_conv2d`, ``idx = chan``), with the
    weight's :func:`direct_conv_cache`; ``relu`` / ``residual``: ``max(y + residual, 0)`` (fused for
    one image, :func:`_direct_conv2d`). Under torch.compile / export: the
    op ``sparsekern::<fmt>_conv2d``, opaque to the compiler (the caches stay in its implementation;
    its fake kernel gives the output shape)."""
    if torch.compiler.is_compiling():
        return _CONV2D_OPS[fmt](x, rowptr, idx, val, bias, out_features, list(kernel_size), list(stride),
                                list(padding), list(dilation), relu, residual)
    return _CONV2D[fmt](x, rowptr, idx, val, bias, out_features, kernel_size, stride, padding, dilation,
                        direct_conv_cache(val, x), relu, residual)
