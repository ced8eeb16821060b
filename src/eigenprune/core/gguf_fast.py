"""The first load of a GGUF file at the cost of one parse and one de-quantization, spread over threads.

`fast_gguf(path)` is a context manager under which transformers' own GGUF loading of `path` (the
tokenizer, the config, the weights) runs as it always does, with its expensive parts done once and early:

- `gguf.GGUFReader(path)` is built once, at entry (parsing the metadata, a 49k-entry vocabulary and its
  merges, was most of a small model's load), and faster (`PlainReader`);
- the metadata-only `load_gguf_checkpoint` result is computed once, at entry (each caller gets its own
  deep copy), and the weights call reuses it instead of parsing every metadata value again;
- every tensor is handed at entry to a thread pool that de-quantizes it (numpy, which releases the GIL)
  and, where transformers' tensor processor for the architecture is pure, processes it (Llama's q/k
  permutation): this overlaps transformers' module imports and tokenizer building, and each quantized
  tensor's pages of the file are given back once read (`_dequantizer`);
- `gguf.get_tensor_name_map(arch, n_blocks)` is built once, not once per module of the model;
- the weights call hands transformers each de-quantized array as the tensor itself where the array is
  fresh (transformers' loop copies every one), so no weight exists twice.

`gc_paused()` pauses Python's cyclic garbage collector around a load: the parses make a few hundred
thousand small objects, and the collector's passes over them took longer than the parsing itself (3/4 of
the reader's time); reference counting still frees everything that is not in a cycle.

The values are those of the plain load: the same functions (`dequantize`, the architecture's tensor
processor, `Tensor.to(dtype)`) on the same bytes. Anything this does not recognise (a transformers without
these functions, another file, other arguments, a file it cannot parse) goes to the original functions.
"""

from __future__ import annotations

import array
import contextlib
import copy
import functools
import gc
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch


def _plain_reader_class(base: type) -> type:
    import struct

    import numpy as np
    from gguf import GGUFValueType

    class PlainReader(base):
        """gguf's reader, with the same fields for less work: it reads through a plain ndarray view of its
        memmap (numpy's memmap subclass costs more per slice than the slice itself); an array of strings (a
        vocabulary, its merges: about 100k strings for SmolLM2) is cut in one loop into memoryviews of the
        file's bytes, made when read (`_StringParts`), where gguf makes two numpy arrays per string by recursion;
        an array of numbers (token types) is read at once and sliced into gguf's one-element parts. A
        memoryview has what gguf and transformers use of a string's part (`nbytes`, `bytes(part)`,
        `list(part)`), and transformers turns it into the same `str` faster."""

        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)  # the same bytes, no copy
            count = int(count)
            end = offset + int(np.empty([], dtype=dtype).itemsize) * count
            arr = plain[offset:end].view(dtype=dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

        def _get_field_parts(self, orig_offs, raw_type):
            if raw_type != GGUFValueType.ARRAY or self.byte_order != "I":  # "I": the file's order is the host's
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype, alen = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
            itype, count = GGUFValueType(int(raw_itype[0])), int(alen[0])
            scalar = self.gguf_scalar_to_np.get(itype)
            if scalar is not None and count:
                values = self._get(orig_offs + 12, scalar, count)
                parts = [raw_itype, alen, *(values[i:i + 1] for i in range(count))]
                return 12 + int(values.nbytes), parts, list(range(2, len(parts))), [GGUFValueType.ARRAY, itype]
            if itype != GGUFValueType.STRING or not count:
                return super()._get_field_parts(orig_offs, raw_type)
            data, length = memoryview(self._plain), struct.Struct("=Q").unpack_from  # (file bytes,) format "B"
            starts = array.array("q")  # (count,) where each string's length field is
            offs = orig_offs + 12
            for _ in range(count):
                starts.append(offs)
                offs += 8 + length(data, offs)[0]
            parts = _StringParts(data, [raw_itype, alen], starts, offs)
            return offs - orig_offs, parts, list(range(3, len(parts), 2)), [GGUFValueType.ARRAY, GGUFValueType.STRING]

    return PlainReader


class _StringParts(Sequence):
    """gguf's parts of an array of strings, `[type, count, length_0, string_0, length_1, ...]`, made when read:
    memoryviews of the file's bytes (a vocabulary and its merges are 200k parts, 55 MB as objects)."""

    def __init__(self, data: memoryview, head: list, starts: array.array, end: int):
        self.data, self.head, self.starts, self.end = data, head, starts, end

    def __len__(self) -> int:
        return len(self.head) + 2 * len(self.starts)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        if index < len(self.head):
            return self.head[index]
        string, is_text = divmod(index - len(self.head), 2)
        start = self.starts[string]
        if not is_text:
            return self.data[start:start + 8].cast("Q")
        stop = self.starts[string + 1] if string + 1 < len(self.starts) else self.end
        return self.data[start + 8:stop]


def _pure_processors(hf_gguf) -> tuple[type, ...]:
    """transformers' tensor processors whose `process` reads only its weights, name and config, so that it can
    run on a worker thread ahead of the loop (the others write into the loop's shared state)."""
    names = ("TensorProcessor", "LlamaTensorProcessor", "Gemma2TensorProcessor")
    return tuple(getattr(hf_gguf, name) for name in names if hasattr(hf_gguf, name))


def _dequantizer(reader):
    """`gguf.dequantize` for the tensors of `reader`, giving the file's pages of each quantized tensor back to the
    kernel once its floats exist: they are read once, and kept they would add the file's size to the peak. The
    mapping is read-only and backed by the file, so a page given back is read again from it if ever touched."""
    import mmap

    import gguf
    import numpy as np

    mapped = getattr(reader.data, "_mmap", None)  # numpy's memmap keeps its mmap.mmap here
    start = reader.data.__array_interface__["data"][0] - getattr(reader.data, "offset", 0)
    page = mmap.PAGESIZE

    def dequantize(data, qtype):
        values = gguf.dequantize(data, qtype)
        if mapped is not None and hasattr(mapped, "madvise") and not np.may_share_memory(values, data):
            first = data.__array_interface__["data"][0] - start
            lo, hi = -(-first // page) * page, (first + data.nbytes) // page * page  # whole pages inside the tensor
            if hi > lo:
                with contextlib.suppress(OSError, ValueError):
                    mapped.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        return values

    return dequantize


def _job(dequantize, processor, tensor):
    """One tensor's work on a worker thread: de-quantize it (a fresh array), then run a pure processor on it
    (`_pure_processors`), so that its array and the processed copy come and go on the same thread."""
    import numpy as np

    values = dequantize(tensor.data, tensor.tensor_type)
    if np.may_share_memory(values, tensor.data):  # a float32 tensor is a view of the file: copied here, where the
        values = np.copy(values)  # heap has room (on the main thread each small copy grew it by a 2 MB page)
    return values if processor is None else processor.process(weights=values, name=tensor.name,
                                                             tensor_key_mapping={}, parsed_parameters={})


def _legacy_tensors(hf_gguf, reader, metadata: dict, futures: list[Future], model, torch_dtype) -> dict:
    """What `load_gguf_checkpoint(..., return_tensors=True)` returns, from the parsed `metadata` and the worker
    threads' results in `futures` (the reader's tensor order; each an array, or the `GGUFTensor` a pure
    processor already made of it): transformers' loop, less its copies."""
    import numpy as np

    parsed = copy.deepcopy(metadata)
    parsed["tensors"] = {}
    architecture = hf_gguf.read_field(reader, "general.architecture")[0]
    processor = hf_gguf.TENSOR_PROCESSORS.get(architecture, hf_gguf.TensorProcessor)(config=parsed.get("config", {}))
    mapping = hf_gguf.get_gguf_hf_weights_map(model, processor)
    memmap, waiting = reader.data, deque(futures)
    futures.clear()  # each array lives on only as its tensor (or not at all): nothing here keeps it
    for tensor in reader.tensors:
        result = waiting.popleft().result()
        if isinstance(result, np.ndarray):
            result = processor.process(weights=result, name=tensor.name, tensor_key_mapping=mapping,
                                       parsed_parameters=parsed)
        if result.name not in mapping:
            continue
        weights = result.weights
        fresh = weights.flags.c_contiguous and weights.flags.writeable and not np.may_share_memory(weights, memmap)
        value = torch.from_numpy(weights if fresh else np.copy(weights))  # (a non-pure processor's view)
        if torch_dtype is not None:
            value = value.to(torch_dtype)
        parsed["tensors"][mapping[result.name]] = value
    return parsed


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off within the context, as it was after (see the module docstring)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


@contextlib.contextmanager
def fast_gguf(path: Path, threads: int | None = None) -> Iterator[None]:
    """Within the context, transformers' GGUF loading of `path` does its work once, early and in parallel (see
    the module docstring); on exit gguf's and transformers' functions are restored and the threads stopped."""
    try:
        import gguf
        import transformers.modeling_gguf_pytorch_utils as hf_gguf
    except ImportError:  # transformers or gguf too old for GGUF: the plain path reports it
        yield
        return
    if not all(hasattr(hf_gguf, name) for name in ("read_field", "TENSOR_PROCESSORS", "get_gguf_hf_weights_map")):
        yield  # a transformers whose GGUF loop this module does not know: leave it alone
        return
    path = Path(path).resolve()
    original = {"reader": gguf.GGUFReader, "names": gguf.get_tensor_name_map,
                "checkpoint": hf_gguf.load_gguf_checkpoint}
    try:
        ours = _plain_reader_class(original["reader"])(str(path))
    except Exception:  # noqa: BLE001 (not a GGUF file, truncated, ...): the plain load says what is wrong, as always
        yield
        return
    metadata: dict[str, dict] = {}
    futures: list[Future] = []
    pool = ThreadPoolExecutor(threads or max(1, min(8, torch.get_num_threads())), thread_name_prefix="dequantize")

    def reader(file, *args, **kwargs):
        if not args and not kwargs and Path(file).resolve() == path:
            return ours
        return original["reader"](file, *args, **kwargs)

    def checkpoint(file, return_tensors=False, **kwargs):
        mine = Path(file).resolve() == path
        if mine and "plain" not in metadata:
            metadata["plain"] = original["checkpoint"](file, return_tensors=False)
        if mine and not return_tensors and not kwargs:
            return copy.deepcopy(metadata["plain"])
        if mine and return_tensors and futures and set(kwargs) <= {"model_to_load", "torch_dtype"}:
            # once (it empties `futures`): a second weights call de-quantizes again, the plain way
            return _legacy_tensors(hf_gguf, ours, metadata["plain"], futures, kwargs.get("model_to_load"),
                                   kwargs.get("torch_dtype"))
        return original["checkpoint"](file, return_tensors=return_tensors, **kwargs)

    gguf.GGUFReader, hf_gguf.load_gguf_checkpoint = reader, checkpoint
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original["names"])
    try:
        processor = None
        with contextlib.suppress(Exception):  # an unsupported file: the plain calls later say so, as they always did
            metadata["plain"] = original["checkpoint"](str(path), return_tensors=False)
            kind = hf_gguf.TENSOR_PROCESSORS.get(hf_gguf.read_field(ours, "general.architecture")[0],
                                                 hf_gguf.TensorProcessor)
            if kind in _pure_processors(hf_gguf):
                processor = kind(config=copy.deepcopy(metadata["plain"].get("config", {})))
        dequantize = _dequantizer(ours)
        futures += [pool.submit(_job, dequantize, processor, t) for t in ours.tensors]  # all, in file order
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original["reader"], original["names"]
        hf_gguf.load_gguf_checkpoint = original["checkpoint"]
        futures.clear()
        pool.shutdown(wait=True, cancel_futures=True)
