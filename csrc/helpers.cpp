// Fast index builders for the GPT datasets, exposed to Python through pybind11.
//
// Every function here has a NumPy reference in megatron_andromeda/data/index_reference.py and a
// property test holding the two equal.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>
#include <stdexcept>

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
constexpr int kSourceBits = 16;               // low bits of a heap key hold the source

void advance(Source& s) {  // next_ <- next_ + D / n, saturating at kNever
  if (s.next_q >= kNever) return;
  s.next_q += s.step_q;
  s.next_r += s.step_r;
  if (s.next_r >= s.numerator) {
    s.next_r -= s.numerator;
    ++s.next_q;
  }
  if (s.next_q > kNever) s.next_q = kNever;
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

template <typename SourceIndex>
void blend_impl(const int64_t* numerators, int64_t num_sources, int64_t denominator, int64_t size,
                SourceIndex* dataset_index, int64_t* dataset_sample_index) {
  std::vector<Source> sources(num_sources);
  std::vector<int64_t> counts(num_sources, 0);
  KeyHeap ready(num_sources), waiting(num_sources);  // ready: by deadline; waiting: by release
  for (int64_t i = 0; i < num_sources; ++i) {
    const int64_t n = numerators[i];
    if (n == 0) continue;  // weight zero: never released
    Source& s = sources[i];
    s = Source{denominator / n, denominator % n, denominator / n, denominator % n, n};
    ready.push(pack(deadline(s), i));  // the first sample's window opens at slot 0
  }
  for (int64_t t = 0; t < size; ++t) {
    while (!waiting.empty() && static_cast<int64_t>(waiting.top() >> kSourceBits) <= t) {
      const int64_t i = static_cast<int64_t>(waiting.pop() & ((1u << kSourceBits) - 1));
      ready.push(pack(deadline(sources[i]), i));
    }
    if (ready.empty()) throw std::logic_error("build_blending_indices: no source ready (weights do not sum to 1)");
    const int64_t i = static_cast<int64_t>(ready.pop() & ((1u << kSourceBits) - 1));
    dataset_index[t] = static_cast<SourceIndex>(i);
    dataset_sample_index[t] = counts[i]++;
    Source& s = sources[i];
    const int64_t release = s.next_q;  // floor(count * D / n) for the new count
    advance(s);
    if (release <= t + 1) {
      ready.push(pack(deadline(s), i));
    } else {
      waiting.push(pack(release, i));
    }
  }
}

py::tuple build_blending_indices(const py::array_t<int64_t, py::array::c_style>& numerators_,
                                 int64_t denominator, int64_t size) {
  const int64_t num_sources = numerators_.shape(0);
  if (num_sources < 1 || num_sources > (1 << 15)) throw std::invalid_argument("need 1 to 32768 sources");
  if (size < 0 || size >= kNever) throw std::invalid_argument("size out of range");
  if (denominator <= 0 || denominator > (int64_t{1} << 62)) throw std::invalid_argument("denominator out of range");
  const int64_t* numerators = numerators_.data();
  int64_t total = 0;
  for (int64_t i = 0; i < num_sources; ++i) {
    if (numerators[i] < 0) throw std::invalid_argument("numerators must be non-negative");
    total += numerators[i];
  }
  if (total != denominator) throw std::invalid_argument("numerators must sum to the denominator");

  py::array_t<int64_t> sample_index(size);
  int64_t* sample_ptr = sample_index.mutable_data();
  py::array result = num_sources <= 256 ? py::array(py::array_t<uint8_t>(size)) : py::array(py::array_t<int16_t>(size));
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

}  // namespace

PYBIND11_MODULE(_helpers, m) {
  m.doc() = "C++ index builders for megatron_andromeda datasets";
  m.def("build_sample_idx", &build_sample_idx, py::arg("sizes"), py::arg("doc_idx"), py::arg("seq_length"),
        py::arg("num_samples"), py::arg("use_int64") = false,
        "Start (doc_idx position, offset) of each seq_length+1-token sample; shape [num_samples+1, 2].");
  m.def("build_blending_indices", &build_blending_indices, py::arg("numerators"), py::arg("denominator"),
        py::arg("size"),
        "(dataset_index uint8|int16, dataset_sample_index int64) for a blend with integer weights "
        "numerators / denominator; every prefix is within one sample of its target share.");
}
