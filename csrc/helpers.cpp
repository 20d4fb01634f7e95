// Fast index builders and sample gathering for the GPT datasets, exposed to Python via pybind11.
//
// Every function here has a NumPy reference in megatron_andromeda/data/index_reference.py
// (SampleGatherer::gather: gather_sample) and a property test holding the two equal.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

// Sample index: for each fixed-length sample, where it starts as (position in doc_idx, token
// offset within that document). Sample i covers tokens [start_i, start_{i+1}] (seq_length + 1
// tokens: the extra token is the label of the last position), so consecutive samples overlap by one.
template <typename Index>
py::array_t<Index> build_sample_idx_impl(const py::array_t<int32_t, py::array::c_style>& sizes_,
                                         const py::array_t<int32_t, py::array::c_style>& doc_idx_,
                                         int64_t seq_length, int64_t num_samples) {
  if (seq_length <= 0) throw std::invalid_argument("seq_length must be positive");
  auto sizes = sizes_.unchecked<1>();
  auto doc_idx = doc_idx_.unchecked<1>();
  py::array_t<Index> result({num_samples + 1, static_cast<int64_t>(2)});
  auto out = result.template mutable_unchecked<2>();
  const int64_t num_docs_in_order = doc_idx.shape(0);

  int64_t doc_pos = 0;  // position in doc_idx
  int64_t offset = 0;   // token offset within the current document
  out(0, 0) = 0;
  out(0, 1) = 0;
  {
    py::gil_scoped_release release;
    for (int64_t sample = 1; sample <= num_samples; ++sample) {
      int64_t remaining = seq_length + 1;  // tokens still to cover, the label token included
      while (remaining != 0) {
        if (doc_pos >= num_docs_in_order) {
          throw std::out_of_range("build_sample_idx: not enough tokens in doc_idx for num_samples");
        }
        const int64_t doc_length = static_cast<int64_t>(sizes(doc_idx(doc_pos))) - offset;
        remaining -= doc_length;
        if (remaining <= 0) {
          // The sample ends inside this document; the next one starts at its last token.
          offset += remaining + doc_length - 1;
          remaining = 0;
        } else {
          ++doc_pos;
          offset = 0;
        }
      }
      out(sample, 0) = static_cast<Index>(doc_pos);
      out(sample, 1) = static_cast<Index>(offset);
    }
  }
  return result;
}

py::array build_sample_idx(const py::array_t<int32_t, py::array::c_style>& sizes,
                           const py::array_t<int32_t, py::array::c_style>& doc_idx, int64_t seq_length,
                           int64_t num_samples, bool use_int64) {
  if (use_int64) return build_sample_idx_impl<int64_t>(sizes, doc_idx, seq_length, num_samples);
  return build_sample_idx_impl<int32_t>(sizes, doc_idx, seq_length, num_samples);
}

// Blending index: which source (dataset_index) and which of its samples (dataset_sample_index) fills
// each slot of a blend. Source i has integer weight numerators[i] / denominator (the numerators sum
// to the denominator). Its k-th sample (k = 1, 2, ...) may only go in a slot t of the window
// [floor((k-1) D / n_i), ceil(k D / n_i)); each slot takes, among the sources whose next window has
// opened, the one whose window closes first (ties: lowest source). This is earliest-deadline-first
// on Pfair windows, which meets every deadline when the weights sum to one, so after any prefix of
// s slots each source's count is within one sample of weight * s. The arithmetic is exact: every
// bound is kept as quotient + remainder and advanced by additions.
struct Source {
  int64_t step_q, step_r;  // D / n and D % n
  int64_t next_q, next_r;  // (count + 1) * D as quotient and remainder by n
  int64_t numerator;
};

constexpr int64_t kNever = int64_t{1} << 47;  // a slot past any real blend size
constexpr int kSourceBits = 16;               // low bits of a key hold the source
constexpr uint64_t kSourceMask = (uint64_t{1} << kSourceBits) - 1;
constexpr int64_t kScanMaxSources = 64;

// next_ <- next_ + D / n, saturating at kNever; branch-free because the carry is random.
void advance(Source& s) {
  const int64_t r = s.next_r + s.step_r;
  const int64_t carry = r >= s.numerator ? 1 : 0;
  s.next_r = r - carry * s.numerator;
  const int64_t q = s.next_q + s.step_q + carry;
  s.next_q = q < kNever ? q : kNever;
}

int64_t deadline(const Source& s) { return s.next_q + (s.next_r != 0 ? 1 : 0); }

// A binary min-heap of packed (bound << kSourceBits | source) keys: one 64-bit compare per level.
class KeyHeap {
 public:
  explicit KeyHeap(size_t capacity) { keys_.reserve(capacity); }
  bool empty() const { return keys_.empty(); }
  uint64_t top() const { return keys_.front(); }
  void push(uint64_t key) {
    keys_.push_back(key);
    std::push_heap(keys_.begin(), keys_.end(), std::greater<uint64_t>());
  }
  uint64_t pop() {
    std::pop_heap(keys_.begin(), keys_.end(), std::greater<uint64_t>());
    const uint64_t key = keys_.back();
    keys_.pop_back();
    return key;
  }

 private:
  std::vector<uint64_t> keys_;
};

uint64_t pack(int64_t bound, int64_t source) {
  return (static_cast<uint64_t>(bound) << kSourceBits) | static_cast<uint64_t>(source);
}

// Few sources: a branch-free scan of every source per slot beats a heap (no mispredicted branches).
template <typename SourceIndex>
void blend_scan(std::vector<Source>& sources, int64_t size, SourceIndex* dataset_index,
                int64_t* dataset_sample_index) {
  const int64_t n = static_cast<int64_t>(sources.size());
  std::vector<int64_t> release(n, 0), counts(n, 0);
  std::vector<uint64_t> key(n);  // packed (deadline, source) of each source's next sample
  for (int64_t i = 0; i < n; ++i) {
    if (sources[i].numerator == 0) release[i] = kNever;
    key[i] = pack(deadline(sources[i]), i);
  }
  const uint64_t kNone = ~uint64_t{0};
  const int64_t* rel = release.data();
  const uint64_t* keys = key.data();
  for (int64_t t = 0; t < size; ++t) {
    // A waiting source (release > t) has its key masked to kNone by the sign of t - release.
    // Four independent minima keep the dependency chain short.
    uint64_t best[4] = {kNone, kNone, kNone, kNone};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      for (int lane = 0; lane < 4; ++lane) {
        const uint64_t k = keys[i + lane] | static_cast<uint64_t>((t - rel[i + lane]) >> 63);
        best[lane] = k < best[lane] ? k : best[lane];
      }
    }
    for (; i < n; ++i) {
      const uint64_t k = keys[i] | static_cast<uint64_t>((t - rel[i]) >> 63);
      best[0] = k < best[0] ? k : best[0];
    }
    best[0] = std::min(std::min(best[0], best[1]), std::min(best[2], best[3]));
    if (best[0] == kNone) throw std::logic_error("build_blending_indices: no source ready");
    const int64_t j = static_cast<int64_t>(best[0] & kSourceMask);
    dataset_index[t] = static_cast<SourceIndex>(j);
    dataset_sample_index[t] = counts[j]++;
    release[j] = sources[j].next_q;  // floor(count * D / n) for the new count
    advance(sources[j]);
    key[j] = pack(deadline(sources[j]), j);
  }
}

// Many sources: ready sources in a heap by deadline, waiting ones in a heap by release.
template <typename SourceIndex>
void blend_heap(std::vector<Source>& sources, int64_t size, SourceIndex* dataset_index,
                int64_t* dataset_sample_index) {
  const int64_t n = static_cast<int64_t>(sources.size());
  std::vector<int64_t> counts(n, 0);
  KeyHeap ready(n), waiting(n);
  for (int64_t i = 0; i < n; ++i) {
    if (sources[i].numerator != 0) ready.push(pack(deadline(sources[i]), i));
  }
  for (int64_t t = 0; t < size; ++t) {
    while (!waiting.empty() && static_cast<int64_t>(waiting.top() >> kSourceBits) <= t) {
      const int64_t i = static_cast<int64_t>(waiting.pop() & kSourceMask);
      ready.push(pack(deadline(sources[i]), i));
    }
    if (ready.empty()) throw std::logic_error("build_blending_indices: no source ready");
    const int64_t i = static_cast<int64_t>(ready.pop() & kSourceMask);
    dataset_index[t] = static_cast<SourceIndex>(i);
    dataset_sample_index[t] = counts[i]++;
    const int64_t release = sources[i].next_q;
    advance(sources[i]);
    if (release <= t + 1) {
      ready.push(pack(deadline(sources[i]), i));
    } else {
      waiting.push(pack(release, i));
    }
  }
}

template <typename SourceIndex>
void blend_impl(const int64_t* numerators, int64_t num_sources, int64_t denominator, int64_t size,
                SourceIndex* dataset_index, int64_t* dataset_sample_index) {
  std::vector<Source> sources(num_sources);
  for (int64_t i = 0; i < num_sources; ++i) {
    const int64_t n = numerators[i];
    // A zero weight is never scheduled; its other fields are unused. A tiny one may have its first
    // deadline past kNever: saturate it like every later bound.
    sources[i] = n == 0 ? Source{0, 0, kNever, 0, 0}
                        : Source{denominator / n, denominator % n, std::min(denominator / n, kNever),
                                 denominator % n, n};
  }
  if (num_sources <= kScanMaxSources) {
    blend_scan(sources, size, dataset_index, dataset_sample_index);
  } else {
    blend_heap(sources, size, dataset_index, dataset_sample_index);
  }
}

py::tuple build_blending_indices(const py::array_t<int64_t, py::array::c_style>& numerators_,
                                 int64_t denominator, int64_t size) {
  const int64_t num_sources = numerators_.shape(0);
  if (num_sources < 1 || num_sources > (1 << 15)) throw std::invalid_argument("need 1 to 32768 sources");
  if (size < 0 || size >= kNever) throw std::invalid_argument("size out of range");
  if (denominator <= 0 || denominator > (int64_t{1} << 62)) {
    throw std::invalid_argument("denominator out of range");
  }
  const int64_t* numerators = numerators_.data();
  int64_t total = 0;
  for (int64_t i = 0; i < num_sources; ++i) {
    if (numerators[i] < 0 || numerators[i] > denominator - total) {
      throw std::invalid_argument("numerators must be non-negative and sum to the denominator");
    }
    total += numerators[i];
  }
  if (total != denominator) throw std::invalid_argument("numerators must sum to the denominator");

  py::array_t<int64_t> sample_index(size);
  int64_t* sample_ptr = sample_index.mutable_data();
  py::array result = num_sources <= 256 ? py::array(py::array_t<uint8_t>(size))
                                        : py::array(py::array_t<int16_t>(size));
  void* index_ptr = result.mutable_data();
  {
    py::gil_scoped_release release;
    if (num_sources <= 256) {
      blend_impl(numerators, num_sources, denominator, size, static_cast<uint8_t*>(index_ptr), sample_ptr);
    } else {
      blend_impl(numerators, num_sources, denominator, size, static_cast<int16_t*>(index_ptr), sample_ptr);
    }
  }
  return py::make_tuple(result, sample_index);
}


// Copies one sample's seq_length + 1 tokens out of the memory-mapped token file as int64. It holds
// the index arrays once (constructed per dataset) so each fetch converts a single integer argument:
// per-sample Python overhead is what bounds random-access loading speed.
class SampleGatherer {
 public:
  SampleGatherer(py::array tokens, py::array_t<int64_t, py::array::c_style> token_starts,
                 py::array_t<int32_t, py::array::c_style> sizes,
                 py::array_t<int32_t, py::array::c_style> doc_idx,
                 py::array sample_idx, int64_t seq_length)
      : tokens_(std::move(tokens)), token_starts_(std::move(token_starts)), sizes_(std::move(sizes)),
        doc_idx_(std::move(doc_idx)), sample_idx_(std::move(sample_idx)), seq_length_(seq_length) {
    if (!(tokens_.flags() & py::array::c_style) || tokens_.ndim() != 1) {
      throw std::invalid_argument("tokens must be a contiguous 1-D array");
    }
    if (!(sample_idx_.flags() & py::array::c_style) || sample_idx_.ndim() != 2 || sample_idx_.shape(1) != 2)
      throw std::invalid_argument("sample_idx must be a contiguous [n, 2] array");
    if (token_starts_.shape(0) != sizes_.shape(0)) {
      throw std::invalid_argument("token_starts and sizes differ in length");
    }
    if (py::isinstance<py::array_t<int32_t>>(sample_idx_)) {
      wide_index_ = false;
    } else if (py::isinstance<py::array_t<int64_t>>(sample_idx_)) {
      wide_index_ = true;
    } else {
      throw std::invalid_argument("sample_idx must be int32 or int64");
    }
    copy_ = copier_for(tokens_);
  }

  int64_t num_samples() const { return sample_idx_.shape(0) - 1; }

  py::array_t<int64_t> gather(int64_t sample) const {
    if (sample < 0 || sample >= num_samples()) throw py::index_error("sample out of range");
    py::array_t<int64_t> result(seq_length_ + 1);
    int64_t* out = result.mutable_data();
    const int64_t first = index(sample, 0), first_offset = index(sample, 1);
    const int64_t last = index(sample + 1, 0), last_offset = index(sample + 1, 1);
    const int32_t* doc_idx = doc_idx_.data();
    const int64_t* starts = token_starts_.data();
    const int32_t* sizes = sizes_.data();
    int64_t filled = 0;
    for (int64_t pos = first; pos <= last; ++pos) {
      const int32_t doc = doc_idx[pos];
      if (doc < 0 || doc >= sizes_.shape(0)) throw std::out_of_range("doc_idx entry out of range");
      const int64_t begin = starts[doc] + (pos == first ? first_offset : 0);
      const int64_t end = pos == last ? starts[doc] + last_offset + 1 : starts[doc] + sizes[doc];
      if (begin < 0 || end < begin || filled + (end - begin) > seq_length_ + 1 || end > tokens_.shape(0)) {
        throw std::out_of_range("corrupt sample index");
      }
      copy_(tokens_.data(), begin, end - begin, out + filled);
      filled += end - begin;
    }
    if (filled != seq_length_ + 1) throw std::out_of_range("corrupt sample index");
    return result;
  }

 private:
  using Copier = void (*)(const void*, int64_t, int64_t, int64_t*);

  template <typename T>
  static void copy_as_int64(const void* tokens, int64_t begin, int64_t count, int64_t* out) {
    const T* src = static_cast<const T*>(tokens) + begin;
    for (int64_t k = 0; k < count; ++k) out[k] = static_cast<int64_t>(src[k]);
  }

  static Copier copier_for(const py::array& tokens) {
    if (py::isinstance<py::array_t<uint16_t>>(tokens)) return &copy_as_int64<uint16_t>;
    if (py::isinstance<py::array_t<int32_t>>(tokens)) return &copy_as_int64<int32_t>;
    if (py::isinstance<py::array_t<uint8_t>>(tokens)) return &copy_as_int64<uint8_t>;
    if (py::isinstance<py::array_t<int8_t>>(tokens)) return &copy_as_int64<int8_t>;
    if (py::isinstance<py::array_t<int16_t>>(tokens)) return &copy_as_int64<int16_t>;
    if (py::isinstance<py::array_t<int64_t>>(tokens)) return &copy_as_int64<int64_t>;
    throw std::invalid_argument("tokens must have an integer dtype");
  }

  int64_t index(int64_t row, int64_t column) const {
    const void* base = sample_idx_.data();
    return wide_index_ ? static_cast<const int64_t*>(base)[2 * row + column]
                       : static_cast<const int32_t*>(base)[2 * row + column];
  }

  py::array tokens_;
  py::array_t<int64_t, py::array::c_style> token_starts_;
  py::array_t<int32_t, py::array::c_style> sizes_;
  py::array_t<int32_t, py::array::c_style> doc_idx_;
  py::array sample_idx_;
  int64_t seq_length_;
  bool wide_index_ = false;
  Copier copy_ = nullptr;
};


// Per-position document bookkeeping for a sample's inputs: position ids restarting at 0 after each
// end-of-document token, and segment ids counting the end-of-document tokens strictly before each
// position (so an EOD token belongs to the document it closes). One pass instead of ~6 NumPy calls.
py::tuple document_positions(const py::array_t<int64_t, py::array::c_style>& tokens_, int64_t eod_id) {
  const int64_t n = tokens_.shape(0);
  const int64_t* tokens = tokens_.data();
  py::array_t<int64_t> positions_(n), segments_(n);
  int64_t* positions = positions_.mutable_data();
  int64_t* segments = segments_.mutable_data();
  int64_t position = 0, segment = 0;
  for (int64_t k = 0; k < n; ++k) {
    positions[k] = position;
    segments[k] = segment;
    const bool eod = tokens[k] == eod_id;
    position = eod ? 0 : position + 1;
    segment += eod ? 1 : 0;
  }
  return py::make_tuple(positions_, segments_);
}

}  // namespace

PYBIND11_MODULE(_helpers, m) {
  m.doc() = "C++ index builders for megatron_andromeda datasets";
  m.def("build_sample_idx", &build_sample_idx, py::arg("sizes"), py::arg("doc_idx"), py::arg("seq_length"),
        py::arg("num_samples"), py::arg("use_int64") = false,
        "Start (doc_idx position, offset) of each seq_length+1-token sample; shape [num_samples+1, 2].");
  py::class_<SampleGatherer>(m, "SampleGatherer")
      .def(py::init<py::array, py::array_t<int64_t, py::array::c_style>,
                    py::array_t<int32_t, py::array::c_style>, py::array_t<int32_t, py::array::c_style>,
                    py::array, int64_t>(),
           py::arg("tokens"), py::arg("token_starts"), py::arg("sizes"), py::arg("doc_idx"),
           py::arg("sample_idx"), py::arg("seq_length"))
      .def("gather", &SampleGatherer::gather, py::arg("sample"),
           "The sample's seq_length + 1 tokens as a new int64 array.")
      .def_property_readonly("num_samples", &SampleGatherer::num_samples);
  m.def("document_positions", &document_positions, py::arg("tokens"), py::arg("eod_id"),
        "(position_ids, segment_ids) of a token row: positions restart and segments advance after each EOD.");
  m.def("build_blending_indices", &build_blending_indices, py::arg("numerators"), py::arg("denominator"),
        py::arg("size"),
        "(dataset_index uint8|int16, dataset_sample_index int64) for a blend with integer weights "
        "numerators / denominator; every prefix is within one sample of its target share.");
}
