// Hot loops of the preprocessing pipeline, exposed to Python via pybind11 as
// megatron_andromeda.preprocess._fast.
//
// decode_jsonl_columns: the text fields of JSONL lines as UTF-8, parsed with the GIL released, one
// buffer per key with the documents back to back and 0xFF (a byte UTF-8 never holds) after each,
// the layout gigatoken's BytesSource splits in parallel. It is exact by construction rather than by
// imitation: a line is taken only when it is well-formed UTF-8 and strict RFC 8259 JSON that Python's
// json.loads would turn into a dict whose requested keys all hold strings without lone surrogates;
// every other line is flagged and Python decodes it (and reports why it is malformed). For the lines
// it takes, the bytes are the UTF-8 encoding of the strings json.loads gives.
// megatron_andromeda/preprocess/fast.py wraps it; a property test holds it equal to readers.py.
//
// flatten_with_eod: documents' token ids back to back, re-typed, with an end-of-document id after
// each (fast.with_eod_reference is the NumPy definition).
//
// WordHasher: the words of a document and their hashes (words.split_words_reference is the NumPy
// definition) and the word n-gram quality rules (cleaning.ngram_rules_reference), bit for bit.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

// Nesting deeper than this goes to Python (whose decoder has its own recursion limit).
constexpr int kMaxDepth = 64;
// Longer numbers go to Python: it refuses integers of more than 4300 digits.
constexpr std::ptrdiff_t kMaxNumberChars = 1000;

constexpr uint64_t kOnes = 0x0101010101010101ULL;
constexpr uint64_t kHighs = 0x8080808080808080ULL;

// Whether any of the 8 bytes in `v` needs a closer look inside a JSON string: a quote, a backslash,
// a control character (< 0x20) or a non-ASCII byte. Never a false negative (SWAR zero-byte tests).
inline bool has_string_special(uint64_t v) {
  const uint64_t quote = v ^ (kOnes * '"');
  const uint64_t slash = v ^ (kOnes * '\\');
  const uint64_t zero_quote = (quote - kOnes) & ~quote;
  const uint64_t zero_slash = (slash - kOnes) & ~slash;
  const uint64_t control = (v - kOnes * 0x20) & ~v;
  return ((zero_quote | zero_slash | control | v) & kHighs) != 0;
}

// Length of the valid UTF-8 sequence starting with the non-ASCII byte at p, or 0. Strict as Python's
// decoder: no overlong forms, no encoded surrogates, nothing past U+10FFFF.
inline int utf8_sequence(const uint8_t* p, const uint8_t* end) {
  const uint8_t c = p[0];
  auto cont = [&](int k) { return end - p > k && (p[k] & 0xC0) == 0x80; };
  if (c < 0xC2) return 0;
  if (c < 0xE0) return cont(1) ? 2 : 0;
  if (c < 0xF0) {
    if (!cont(1) || !cont(2)) return 0;
    if (c == 0xE0 && p[1] < 0xA0) return 0;   // overlong
    if (c == 0xED && p[1] >= 0xA0) return 0;  // UTF-16 surrogate
    return 3;
  }
  if (c < 0xF5) {
    if (!cont(1) || !cont(2) || !cont(3)) return 0;
    if (c == 0xF0 && p[1] < 0x90) return 0;   // overlong
    if (c == 0xF4 && p[1] >= 0x90) return 0;  // past U+10FFFF
    return 4;
  }
  return 0;
}

int hex_value(uint8_t c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// The 4 hex digits at p (which must have 4 bytes), or -1.
int32_t hex4(const uint8_t* p) {
  int32_t v = 0;
  for (int k = 0; k < 4; ++k) {
    const int h = hex_value(p[k]);
    if (h < 0) return -1;
    v = v * 16 + h;
  }
  return v;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// What a line's requested key holds: 0 absent, 1 a string (its length in bytes), 2 something else.
struct Capture {
  size_t size = 0;
  uint8_t state = 0;
};

class LineParser {
 public:
  // Key k's decoded string goes at the end of outputs[k], which held marks[k] bytes before the line.
  LineParser(const uint8_t* begin, const uint8_t* end, const std::vector<std::string>& keys,
             std::vector<std::string>& outputs, const std::vector<size_t>& marks)
      : p_(begin), end_(end), keys_(keys), outputs_(outputs), marks_(marks) {}

  // True when the line is one object (with JSON whitespace around it only); the requested keys'
  // last values are then at the end of their outputs, described by `captures`.
  bool parse_line(std::vector<Capture>& captures) {
    captures_ = &captures;
    skip_ws();
    if (p_ >= end_ || *p_ != '{') return false;
    if (!parse_object(1, true)) return false;
    skip_ws();
    return p_ == end_;
  }

 private:
  void skip_ws() {
    while (p_ < end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r')) ++p_;
  }

  // At an opening quote: moves past the closing one, appending the decoded body to `dest` unless it
  // is null. False for anything json.loads rejects (raw control characters, bad escapes, invalid
  // UTF-8, unterminated) and for lone surrogate escapes (json.loads keeps those; Python handles it).
  bool parse_string(std::string* dest) {
    ++p_;
    const uint8_t* run = p_;  // ordinary bytes not yet appended
    auto flush = [&]() {
      if (dest != nullptr) dest->append(reinterpret_cast<const char*>(run), p_ - run);
    };
    while (true) {
      while (end_ - p_ >= 8) {  // 8 ordinary ASCII bytes at a time
        uint64_t block;
        std::memcpy(&block, p_, 8);
        if (has_string_special(block)) break;
        p_ += 8;
      }
      if (p_ >= end_) return false;
      const uint8_t c = *p_;
      if (c == '"') {
        flush();
        ++p_;
        return true;
      }
      if (c < 0x20) return false;
      if (c >= 0x80) {
        const int n = utf8_sequence(p_, end_);
        if (n == 0) return false;
        p_ += n;
        continue;
      }
      if (c != '\\') {
        ++p_;
        continue;
      }
      flush();
      if (!parse_escape(dest)) return false;
      run = p_;
    }
  }

  // At a backslash inside a string: moves past the escape, appending what it stands for.
  bool parse_escape(std::string* dest) {
    if (end_ - p_ < 2) return false;
    const uint8_t e = p_[1];
    char simple = 0;
    switch (e) {
      case '"': simple = '"'; break;
      case '\\': simple = '\\'; break;
      case '/': simple = '/'; break;
      case 'b': simple = '\b'; break;
      case 'f': simple = '\f'; break;
      case 'n': simple = '\n'; break;
      case 'r': simple = '\r'; break;
      case 't': simple = '\t'; break;
      case 'u': break;
      default: return false;
    }
    if (simple != 0) {
      if (dest != nullptr) dest->push_back(simple);
      p_ += 2;
      return true;
    }
    if (end_ - p_ < 6) return false;
    const int32_t high = hex4(p_ + 2);
    if (high < 0 || (high >= 0xDC00 && high <= 0xDFFF)) return false;
    uint32_t cp = static_cast<uint32_t>(high);
    p_ += 6;
    if (cp >= 0xD800 && cp <= 0xDBFF) {  // a high surrogate must pair with a low one here
      if (end_ - p_ < 6 || p_[0] != '\\' || p_[1] != 'u') return false;
      const int32_t low = hex4(p_ + 2);
      if (low < 0xDC00 || low > 0xDFFF) return false;
      cp = 0x10000 + ((cp - 0xD800) << 10) + (static_cast<uint32_t>(low) - 0xDC00);
      p_ += 6;
    }
    if (dest != nullptr) append_utf8(*dest, cp);
    return true;
  }

  bool parse_number() {
    const uint8_t* start = p_;
    auto digit = [&]() { return p_ < end_ && *p_ >= '0' && *p_ <= '9'; };
    if (p_ < end_ && *p_ == '-') ++p_;
    if (!digit()) return false;  // also "-Infinity": Python's extension, left to Python
    if (*p_ == '0') {
      ++p_;
    } else {
      while (digit()) ++p_;
    }
    if (p_ < end_ && *p_ == '.') {
      ++p_;
      if (!digit()) return false;
      while (digit()) ++p_;
    }
    if (p_ < end_ && (*p_ == 'e' || *p_ == 'E')) {
      ++p_;
      if (p_ < end_ && (*p_ == '+' || *p_ == '-')) ++p_;
      if (!digit()) return false;
      while (digit()) ++p_;
    }
    return p_ - start <= kMaxNumberChars;
  }

  bool parse_literal(const char* word, size_t n) {
    if (static_cast<size_t>(end_ - p_) < n || std::memcmp(p_, word, n) != 0) return false;
    p_ += n;
    return true;
  }

  bool parse_value(int depth) {
    if (p_ >= end_) return false;
    switch (*p_) {
      case '"': return parse_string(nullptr);
      case '{': return parse_object(depth + 1, false);
      case '[': return parse_array(depth + 1);
      case 't': return parse_literal("true", 4);
      case 'f': return parse_literal("false", 5);
      case 'n': return parse_literal("null", 4);
      default: return parse_number();  // NaN / Infinity fail here and go to Python
    }
  }

  bool parse_array(int depth) {
    if (depth > kMaxDepth) return false;
    ++p_;
    skip_ws();
    if (p_ < end_ && *p_ == ']') {
      ++p_;
      return true;
    }
    while (true) {
      if (!parse_value(depth)) return false;
      skip_ws();
      if (p_ >= end_) return false;
      if (*p_ == ']') {
        ++p_;
        return true;
      }
      if (*p_ != ',') return false;
      ++p_;
      skip_ws();
    }
  }

  // Index of the requested key equal to the decoded key, or -1.
  int match_key(const std::string& key) const {
    for (size_t k = 0; k < keys_.size(); ++k) {
      if (keys_[k] == key) return static_cast<int>(k);
    }
    return -1;
  }

  bool parse_member(int depth, bool top) {
    if (p_ >= end_ || *p_ != '"') return false;
    key_.clear();
    if (!parse_string(top ? &key_ : nullptr)) return false;
    skip_ws();
    if (p_ >= end_ || *p_ != ':') return false;
    ++p_;
    skip_ws();
    const int k = top ? match_key(key_) : -1;
    if (k < 0) return parse_value(depth);
    Capture& capture = (*captures_)[k];
    if (p_ < end_ && *p_ == '"') {  // the last occurrence wins, as in a Python dict
      std::string& out = outputs_[k];
      out.resize(marks_[k]);  // drop an earlier occurrence of the key
      if (!parse_string(&out)) return false;
      capture = Capture{out.size() - marks_[k], 1};
      return true;
    }
    capture.state = 2;
    return parse_value(depth);
  }

  bool parse_object(int depth, bool top) {
    if (depth > kMaxDepth) return false;
    ++p_;
    skip_ws();
    if (p_ < end_ && *p_ == '}') {
      ++p_;
      return true;
    }
    while (true) {
      if (!parse_member(depth, top)) return false;
      skip_ws();
      if (p_ >= end_) return false;
      if (*p_ == '}') {
        ++p_;
        return true;
      }
      if (*p_ != ',') return false;
      ++p_;
      skip_ws();
    }
  }

  const uint8_t* p_;
  const uint8_t* end_;
  const std::vector<std::string>& keys_;
  std::vector<std::string>& outputs_;
  const std::vector<size_t>& marks_;
  std::vector<Capture>* captures_ = nullptr;
  std::string key_;
};

// (taken uint8 (lines,), buffers: one bytes per key, lengths int64 (taken lines, keys)).
py::tuple decode_jsonl_columns(const py::list& lines, const std::vector<std::string>& keys) {
  const size_t n = lines.size();
  std::vector<const uint8_t*> data(n);
  std::vector<size_t> sizes(n);
  size_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(lines.ptr(), i);
    if (!PyBytes_Check(item)) throw py::type_error("decode_jsonl_columns: lines must be bytes");
    data[i] = reinterpret_cast<const uint8_t*>(PyBytes_AS_STRING(item));
    sizes[i] = static_cast<size_t>(PyBytes_GET_SIZE(item));
    total += sizes[i];
  }
  const size_t nkeys = keys.size();
  py::array_t<uint8_t> taken(static_cast<py::ssize_t>(n));
  uint8_t* ok = taken.mutable_data();
  std::vector<int64_t> lengths;
  // Reused across calls (per thread): no fresh pages to fault in for every chunk.
  static thread_local std::vector<std::string> outputs;
  outputs.resize(nkeys);
  {
    py::gil_scoped_release release;  // the bytes objects stay alive: `lines` holds them
    for (auto& out : outputs) {
      out.clear();
      out.reserve(total + n);  // a decoded value never outgrows its line (+1 for the separator)
    }
    std::vector<size_t> marks(nkeys);
    std::vector<Capture> captures;
    for (size_t i = 0; i < n; ++i) {
      for (size_t k = 0; k < nkeys; ++k) marks[k] = outputs[k].size();
      captures.assign(nkeys, Capture{});
      LineParser parser(data[i], data[i] + sizes[i], keys, outputs, marks);
      bool good = parser.parse_line(captures);
      for (size_t k = 0; good && k < nkeys; ++k) good = captures[k].state == 1;
      ok[i] = good;
      for (size_t k = 0; k < nkeys; ++k) {
        if (!good) {
          outputs[k].resize(marks[k]);  // Python decodes this line
          continue;
        }
        outputs[k].push_back(static_cast<char>(0xFF));
        lengths.push_back(static_cast<int64_t>(captures[k].size));
      }
    }
  }
  py::list buffers(nkeys);
  for (size_t k = 0; k < nkeys; ++k) buffers[k] = py::bytes(outputs[k].data(), outputs[k].size());
  py::array_t<int64_t> sizes_out({static_cast<py::ssize_t>(lengths.size() / std::max<size_t>(nkeys, 1)),
                                  static_cast<py::ssize_t>(nkeys)});
  std::copy(lengths.begin(), lengths.end(), sizes_out.mutable_data());
  return py::make_tuple(taken, buffers, sizes_out);
}

template <typename In, typename Out>
py::array flatten_typed(const py::array& flat_, const int64_t* lengths, int64_t docs, int64_t eod) {
  const In* flat = static_cast<const In*>(flat_.data());
  py::array_t<Out> result(static_cast<py::ssize_t>(flat_.size() + docs));
  Out* out = result.mutable_data();
  {
    py::gil_scoped_release release;
    int64_t src = 0;
    for (int64_t d = 0; d < docs; ++d) {
      for (int64_t k = 0; k < lengths[d]; ++k) *out++ = static_cast<Out>(flat[src++]);
      *out++ = static_cast<Out>(eod);
    }
  }
  return result;
}

// `flat` (uint32 or int64 ids of documents back to back, `lengths` each) as uint16 or int32, with
// `eod` after every document. The caller guarantees every id fits the output type.
py::array flatten_with_eod(const py::array& flat, const py::array_t<int64_t, py::array::c_style>& lengths,
                           int64_t eod, const std::string& dtype) {
  if (flat.ndim() != 1 || !(flat.flags() & py::array::c_style)) {
    throw std::invalid_argument("flatten_with_eod: flat must be a contiguous 1-D array");
  }
  const int64_t docs = lengths.shape(0);
  int64_t total = 0;
  for (int64_t d = 0; d < docs; ++d) {
    if (lengths.data()[d] < 0) throw std::invalid_argument("flatten_with_eod: negative length");
    total += lengths.data()[d];
  }
  if (total != flat.size()) throw std::invalid_argument("flatten_with_eod: lengths do not sum to flat.size");
  const bool in32 = py::isinstance<py::array_t<uint32_t>>(flat);
  if (!in32 && !py::isinstance<py::array_t<int64_t>>(flat)) {
    throw std::invalid_argument("flatten_with_eod: flat must be uint32 or int64");
  }
  if (dtype == "uint16") {
    return in32 ? flatten_typed<uint32_t, uint16_t>(flat, lengths.data(), docs, eod)
                : flatten_typed<int64_t, uint16_t>(flat, lengths.data(), docs, eod);
  }
  if (dtype == "int32") {
    return in32 ? flatten_typed<uint32_t, int32_t>(flat, lengths.data(), docs, eod)
                : flatten_typed<int64_t, int32_t>(flat, lengths.data(), docs, eod);
  }
  throw std::invalid_argument("flatten_with_eod: dtype must be uint16 or int32");
}


inline uint64_t splitmix64(uint64_t x) {
  uint64_t z = x + 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Word hashing and the n-gram rules with the tables of words.py (handed over once, read-only).
class WordHasher {
 public:
  WordHasher(const py::array_t<uint64_t, py::array::c_style>& pair_table,
             const py::array_t<uint64_t, py::array::c_style>& ngram_mult)
      : pairs_(pair_table.data(), pair_table.data() + pair_table.size()),
        mult_(ngram_mult.data(), ngram_mult.data() + ngram_mult.size()) {
    if (pairs_.size() != (1u << 16) || mult_.empty()) {
      throw std::invalid_argument("WordHasher: need a 65536-entry pair table and n-gram multipliers");
    }
  }

  // (hashes uint64, chars int64, has_alpha bool) of the whitespace-separated words of UTF-8 `data`.
  py::tuple split(const py::bytes& data, bool ascii_only) const {
    char* buffer = nullptr;
    Py_ssize_t size = 0;
    PyBytes_AsStringAndSize(data.ptr(), &buffer, &size);
    const uint8_t* s = reinterpret_cast<const uint8_t*>(buffer);
    std::vector<uint64_t> hashes;
    std::vector<int64_t> chars;
    std::vector<uint8_t> alpha;
    {
      py::gil_scoped_release release;
      split_into(s, static_cast<size_t>(size), ascii_only, hashes, chars, alpha);
    }
    py::array_t<uint64_t> h(hashes.size());
    py::array_t<int64_t> c(chars.size());
    py::array_t<bool> a(alpha.size());
    std::copy(hashes.begin(), hashes.end(), h.mutable_data());
    std::copy(chars.begin(), chars.end(), c.mutable_data());
    std::copy(alpha.begin(), alpha.end(), a.mutable_data());
    return py::make_tuple(h, c, a);
  }

  // The first n-gram rule the words break ("top_3gram", "duplicate_5gram", ...) or None; `top` and
  // `duplicate` are (n, limit) pairs sorted by n, as cleaning.ngram_rules_reference walks them.
  py::object ngram_reason(const py::array_t<uint64_t, py::array::c_style>& hashes_,
                          const py::array_t<int64_t, py::array::c_style>& chars_,
                          const std::vector<std::pair<int64_t, double>>& top,
                          const std::vector<std::pair<int64_t, double>>& duplicate) const {
    const int64_t w = hashes_.shape(0);
    if (chars_.shape(0) != w) throw std::invalid_argument("ngram_reason: hashes and chars differ in length");
    std::string reason;
    {
      py::gil_scoped_release release;
      reason = ngram_reason_impl(hashes_.data(), chars_.data(), w, top, duplicate);
    }
    if (reason.empty()) return py::none();
    return py::str(reason);
  }

 private:
  static uint16_t canon(uint8_t b) {
    if (b <= 32) return 32;  // whitespace and controls separate words
    if (b >= 65 && b <= 90) return b | 32;  // ASCII case folding
    return b;
  }

  void split_into(const uint8_t* s, size_t n, bool ascii_only, std::vector<uint64_t>& hashes,
                  std::vector<int64_t>& chars, std::vector<uint8_t>& alpha) const {
    // Positions are those of the whitespace-framed buffer " " + data + " ": data byte k is at k + 1.
    size_t k = 0;
    while (k < n) {
      if (s[k] <= 32) {
        ++k;
        continue;
      }
      const size_t start = k;
      while (k < n && s[k] > 32) ++k;  // the word is s[start, k)
      // Pairs (previous byte, byte) from (space, first) to (last, space); pair j ends at framed j + 1.
      uint64_t plain = 0, weighted = 0, offset = 0;
      uint16_t prev = 32;
      int64_t continuation = 0;
      bool has_alpha = false;
      for (size_t i = start; i <= k; ++i, ++offset) {
        const uint16_t c = i < k ? canon(s[i]) : 32;
        const uint64_t v = pairs_[(static_cast<size_t>(prev) << 8) | c];
        plain += v;
        weighted += v * offset;
        if (i < k) {
          continuation += (s[i] & 0xC0) == 0x80;
          has_alpha = has_alpha || (c >= 97 && c <= 122) || c >= 128;
        }
        prev = c;
      }
      hashes.push_back(splitmix64(splitmix64(plain) ^ weighted));
      chars.push_back(static_cast<int64_t>(k - start) - (ascii_only ? 0 : continuation));
      alpha.push_back(has_alpha);
    }
  }

  // n-gram hashes of words[0..w): g_1 = h M_0, g_k[i] = g_{k-1}[i] + h[i + k - 1] M_{k-1}.
  void extend_grams(const uint64_t* h, int64_t w, int64_t n, int64_t& have, std::vector<uint64_t>& g) const {
    if (have == 0) {
      g.assign(h, h + w);
      for (auto& x : g) x *= mult_[0];
      have = 1;
    }
    for (; have < n; ++have) {  // g holds g_have; make g_{have+1} (one shorter)
      const uint64_t m = mult_[have % mult_.size()];
      const int64_t size = w - have;
      for (int64_t i = 0; i < size; ++i) g[i] += h[i + have] * m;
      g.resize(static_cast<size_t>(std::max<int64_t>(size, 0)));
    }
  }

  // Occurrences of each value of `grams`, in an open-addressing table (linear probing); `slots`
  // holds the index of the first occurrence + 1 (0: empty), `counts` the number of occurrences.
  static void count_values(const std::vector<uint64_t>& grams, std::vector<uint32_t>& slots,
                           std::vector<uint32_t>& counts, int& shift) {
    size_t capacity = 16;
    shift = 60;
    while (capacity < 2 * grams.size()) capacity <<= 1, --shift;
    slots.assign(capacity, 0);
    counts.assign(capacity, 0);
    for (size_t i = 0; i < grams.size(); ++i) {
      size_t slot = static_cast<size_t>((grams[i] * 0x9E3779B97F4A7C15ULL) >> shift);
      while (slots[slot] != 0 && grams[slots[slot] - 1] != grams[i]) slot = (slot + 1) & (capacity - 1);
      if (slots[slot] == 0) slots[slot] = static_cast<uint32_t>(i + 1);
      ++counts[slot];
    }
  }

  static uint32_t count_of(const std::vector<uint64_t>& grams, const std::vector<uint32_t>& slots,
                           const std::vector<uint32_t>& counts, int shift, uint64_t value) {
    const size_t mask = slots.size() - 1;
    size_t slot = static_cast<size_t>((value * 0x9E3779B97F4A7C15ULL) >> shift);
    while (grams[slots[slot] - 1] != value) slot = (slot + 1) & mask;  // present by construction
    return counts[slot];
  }

  std::string ngram_reason_impl(const uint64_t* h, const int64_t* chars, int64_t w,
                                const std::vector<std::pair<int64_t, double>>& top,
                                const std::vector<std::pair<int64_t, double>>& duplicate) const {
    int64_t total_chars = 0;
    for (int64_t i = 0; i < w; ++i) total_chars += chars[i];
    const double total = static_cast<double>(total_chars);
    if (total == 0) return "";
    std::vector<uint64_t> grams;
    std::vector<uint32_t> slots, counts;
    int shift = 0;
    int64_t have = 0;
    for (const auto& [n, limit] : top) {
      if (w - n + 1 < 2) continue;  // fewer than two n-grams
      if (n < have) have = 0;       // (n ascending: never happens, but stay exact)
      extend_grams(h, w, n, have, grams);
      count_values(grams, slots, counts, shift);
      // The most frequent value; among equally frequent ones the smallest (NumPy's argmax over the
      // runs of the sorted values), and its first occurrence.
      uint32_t best_count = 0;
      uint64_t best_value = 0;
      size_t first = 0;
      for (size_t slot = 0; slot < slots.size(); ++slot) {
        if (slots[slot] == 0) continue;
        const uint64_t value = grams[slots[slot] - 1];
        if (counts[slot] > best_count || (counts[slot] == best_count && value < best_value)) {
          best_count = counts[slot], best_value = value, first = slots[slot] - 1;
        }
      }
      int64_t span = 0;
      for (int64_t i = static_cast<int64_t>(first); i < static_cast<int64_t>(first) + n; ++i) span += chars[i];
      if (best_count > 1 && static_cast<double>(best_count) * static_cast<double>(span) / total > limit) {
        return "top_" + std::to_string(n) + "gram";
      }
    }
    have = 0;
    std::vector<int64_t> delta;
    for (size_t item = 0; item < duplicate.size(); ++item) {
      const auto& [n, limit] = duplicate[item];
      double fraction = 0.0;
      if (w >= n) {
        if (n < have) have = 0;
        extend_grams(h, w, n, have, grams);
        count_values(grams, slots, counts, shift);
        // Words inside an n-gram that occurs more than once: +1 where one starts, -1 past its end.
        delta.assign(static_cast<size_t>(w) + 1, 0);
        bool any = false;
        for (size_t i = 0; i < grams.size(); ++i) {
          if (count_of(grams, slots, counts, shift, grams[i]) > 1) {
            any = true;
            ++delta[i];
            --delta[i + n];
          }
        }
        if (any) {
          int64_t depth = 0, dup_chars = 0;
          for (int64_t i = 0; i < w; ++i) {
            depth += delta[i];
            if (depth > 0) dup_chars += chars[i];
          }
          fraction = static_cast<double>(dup_chars) / total;
        }
      }
      if (fraction > limit) return "duplicate_" + std::to_string(n) + "gram";
      bool rest_pass = true;  // larger n cover no more characters: stop once every later limit holds
      for (size_t later = item + 1; later < duplicate.size(); ++later) {
        rest_pass = rest_pass && fraction <= duplicate[later].second;
      }
      if (rest_pass) break;
    }
    return "";
  }

  std::vector<uint64_t> pairs_;
  std::vector<uint64_t> mult_;
};
}  // namespace

PYBIND11_MODULE(_fast, m) {
  m.doc() = "C++ hot loops of the preprocessing pipeline (see csrc/preprocess_fast.cpp)";
  m.def("decode_jsonl_columns", &decode_jsonl_columns, py::arg("lines"), py::arg("keys"),
        "(taken per line, one 0xFF-separated UTF-8 buffer per key, byte lengths (taken lines, keys)); "
        "lines not taken are Python's to decode.");
  m.def("flatten_with_eod", &flatten_with_eod, py::arg("flat"), py::arg("lengths"), py::arg("eod"),
        py::arg("dtype"), "Documents back to back as `dtype` with `eod` after each (see with_eod).");
  py::class_<WordHasher>(m, "WordHasher")
      .def(py::init<const py::array_t<uint64_t, py::array::c_style>&,
                    const py::array_t<uint64_t, py::array::c_style>&>(),
           py::arg("pair_table"), py::arg("ngram_mult"))
      .def("split", &WordHasher::split, py::arg("data"), py::arg("ascii_only"),
           "(hashes, chars, has_alpha) of the words of UTF-8 data (see words.split_words_reference).")
      .def("ngram_reason", &WordHasher::ngram_reason, py::arg("hashes"), py::arg("chars"), py::arg("top"),
           py::arg("duplicate"), "The first n-gram rule broken, or None (see cleaning.ngram_rules_reference).");
}
