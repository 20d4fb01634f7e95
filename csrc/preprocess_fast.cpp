// Hot loops of the preprocessing pipeline, exposed to Python via pybind11 as
// megatron_andromeda.preprocess._fast.
//
// decode_jsonl_texts: the text fields of JSONL lines, parsed with the GIL released. It is exact by
// construction rather than by imitation: a line gets a result only when it is well-formed UTF-8 and
// strict RFC 8259 JSON that Python's json.loads would turn into a dict whose requested keys all hold
// strings without lone surrogates; every other line comes back as None and Python decodes it (and
// reports why it is malformed). For the lines it does take, the strings are the ones json.loads
// gives. megatron_andromeda/preprocess/fast_decode.py holds the Python definition; a property test
// holds them equal.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

// Nesting deeper than this goes to Python (whose decoder has its own recursion limit).
constexpr int kMaxDepth = 64;
// Longer numbers go to Python: it refuses integers of more than 4300 digits.
constexpr std::ptrdiff_t kMaxNumberChars = 1000;

// Strict UTF-8 as Python's decoder accepts it: no overlong forms, no surrogates, nothing past U+10FFFF.
bool valid_utf8(const uint8_t* s, size_t n) {
  size_t i = 0;
  while (i < n) {
    while (i + 8 <= n) {  // ASCII fast path, 8 bytes at a time
      uint64_t block;
      std::memcpy(&block, s + i, 8);
      if (block & 0x8080808080808080ULL) break;
      i += 8;
    }
    if (i >= n) break;
    const uint8_t c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    auto cont = [&](size_t k) { return i + k < n && (s[i + k] & 0xC0) == 0x80; };
    if (c < 0xC2) return false;
    if (c < 0xE0) {
      if (!cont(1)) return false;
      i += 2;
    } else if (c < 0xF0) {
      if (!cont(1) || !cont(2)) return false;
      if (c == 0xE0 && s[i + 1] < 0xA0) return false;   // overlong
      if (c == 0xED && s[i + 1] >= 0xA0) return false;  // UTF-16 surrogate
      i += 3;
    } else if (c < 0xF5) {
      if (!cont(1) || !cont(2) || !cont(3)) return false;
      if (c == 0xF0 && s[i + 1] < 0x90) return false;   // overlong
      if (c == 0xF4 && s[i + 1] >= 0x90) return false;  // past U+10FFFF
      i += 4;
    } else {
      return false;
    }
  }
  return true;
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

constexpr uint64_t kOnes = 0x0101010101010101ULL;
constexpr uint64_t kHighs = 0x8080808080808080ULL;

// Whether any of the 8 bytes in `v` is a quote, a backslash or a control character (< 0x20): the
// bytes a JSON string scan must stop at. Exact (SWAR zero-byte test on v ^ '"', v ^ '\\' and v < 0x20).
inline bool has_string_special(uint64_t v) {
  const uint64_t quote = v ^ (kOnes * '"');
  const uint64_t slash = v ^ (kOnes * '\\');
  const uint64_t zero_quote = (quote - kOnes) & ~quote;
  const uint64_t zero_slash = (slash - kOnes) & ~slash;
  const uint64_t control = (v - kOnes * 0x20) & ~v;
  return ((zero_quote | zero_slash | control) & kHighs) != 0;
}

// A JSON string's body (between the quotes), still escaped when `escaped`.
struct StringSpan {
  const uint8_t* data = nullptr;
  size_t size = 0;
  bool escaped = false;
};

// Append the decoded body of a string that scan_string accepted (so every escape is valid and every
// \u surrogate is paired).
void decode_string(const StringSpan& s, std::string& out) {
  const uint8_t* p = s.data;
  const uint8_t* end = s.data + s.size;
  while (p < end) {
    const uint8_t* slash = static_cast<const uint8_t*>(std::memchr(p, '\\', end - p));
    if (slash == nullptr) slash = end;
    out.append(reinterpret_cast<const char*>(p), slash - p);
    if (slash == end) break;
    p = slash + 1;
    const uint8_t e = *p++;
    switch (e) {
      case 'b': out.push_back('\b'); break;
      case 'f': out.push_back('\f'); break;
      case 'n': out.push_back('\n'); break;
      case 'r': out.push_back('\r'); break;
      case 't': out.push_back('\t'); break;
      case 'u': {
        uint32_t cp = static_cast<uint32_t>(hex4(p));
        p += 4;
        if (cp >= 0xD800 && cp <= 0xDBFF) {  // a high surrogate: scan_string checked the low one follows
          const uint32_t low = static_cast<uint32_t>(hex4(p + 2));
          cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
          p += 6;
        }
        append_utf8(out, cp);
        break;
      }
      default: out.push_back(static_cast<char>(e)); break;  // '"', '\\' and '/'
    }
  }
}

// Requested keys of the top-level object: the last occurrence of each wins, as in a Python dict.
struct Captures {
  const std::vector<std::string>* keys = nullptr;
  std::vector<StringSpan> values;
  std::vector<uint8_t> state;  // 0 absent, 1 string, 2 something else
};

class LineParser {
 public:
  LineParser(const uint8_t* begin, const uint8_t* end) : p_(begin), end_(end) {}

  // True when the line is one object (surrounded by JSON whitespace only), filling `captures`.
  bool parse_line(Captures& captures) {
    skip_ws();
    if (p_ >= end_ || *p_ != '{') return false;
    if (!parse_object(1, &captures)) return false;
    skip_ws();
    return p_ == end_;
  }

 private:
  void skip_ws() {
    while (p_ < end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r')) ++p_;
  }

  // At an opening quote: moves past the closing one. False for anything json.loads rejects (raw
  // control characters, bad escapes, unterminated) and for lone surrogate escapes.
  bool parse_string(StringSpan* span) {
    ++p_;
    const uint8_t* start = p_;
    bool escaped = false;
    while (true) {
      while (end_ - p_ >= 8) {  // 8 ordinary bytes at a time
        uint64_t block;
        std::memcpy(&block, p_, 8);
        if (has_string_special(block)) break;
        p_ += 8;
      }
      if (p_ >= end_) return false;
      const uint8_t c = *p_;
      if (c == '"') {
        if (span != nullptr) *span = StringSpan{start, static_cast<size_t>(p_ - start), escaped};
        ++p_;
        return true;
      }
      if (c < 0x20) return false;
      if (c != '\\') {
        ++p_;
        continue;
      }
      escaped = true;
      if (end_ - p_ < 2) return false;
      const uint8_t e = p_[1];
      if (e == 'u') {
        if (end_ - p_ < 6) return false;
        const int32_t cp = hex4(p_ + 2);
        if (cp < 0 || (cp >= 0xDC00 && cp <= 0xDFFF)) return false;
        p_ += 6;
        if (cp >= 0xD800 && cp <= 0xDBFF) {
          if (end_ - p_ < 6 || p_[0] != '\\' || p_[1] != 'u') return false;
          const int32_t low = hex4(p_ + 2);
          if (low < 0xDC00 || low > 0xDFFF) return false;
          p_ += 6;
        }
      } else if (e == '"' || e == '\\' || e == '/' || e == 'b' || e == 'f' || e == 'n' || e == 'r' ||
                 e == 't') {
        p_ += 2;
      } else {
        return false;
      }
    }
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
      case '{': return parse_object(depth + 1, nullptr);
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

  // Index of the requested key equal to `key`, or -1.
  static int match_key(const StringSpan& key, const std::vector<std::string>& keys, std::string& scratch) {
    const char* data = reinterpret_cast<const char*>(key.data);
    size_t size = key.size;
    if (key.escaped) {
      scratch.clear();
      decode_string(key, scratch);
      data = scratch.data();
      size = scratch.size();
    }
    for (size_t k = 0; k < keys.size(); ++k) {
      if (keys[k].size() == size && std::memcmp(keys[k].data(), data, size) == 0) return static_cast<int>(k);
    }
    return -1;
  }

  bool parse_object(int depth, Captures* captures) {
    if (depth > kMaxDepth) return false;
    ++p_;
    skip_ws();
    if (p_ < end_ && *p_ == '}') {
      ++p_;
      return true;
    }
    std::string scratch;
    while (true) {
      if (p_ >= end_ || *p_ != '"') return false;
      StringSpan key;
      if (!parse_string(&key)) return false;
      skip_ws();
      if (p_ >= end_ || *p_ != ':') return false;
      ++p_;
      skip_ws();
      const int k = captures != nullptr ? match_key(key, *captures->keys, scratch) : -1;
      if (k >= 0 && p_ < end_ && *p_ == '"') {
        if (!parse_string(&captures->values[k])) return false;
        captures->state[k] = 1;
      } else {
        if (!parse_value(depth)) return false;
        if (k >= 0) captures->state[k] = 2;
      }
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
};

// Where a decoded value lives: in the line itself (unescaped) or in the arena.
struct ValueRef {
  const char* line_data = nullptr;  // nullptr: arena
  size_t offset = 0;
  size_t size = 0;
};

py::list decode_jsonl_texts(const py::list& lines, const std::vector<std::string>& keys) {
  const size_t n = lines.size();
  std::vector<const uint8_t*> data(n);
  std::vector<size_t> sizes(n);
  for (size_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(lines.ptr(), i);
    if (!PyBytes_Check(item)) throw py::type_error("decode_jsonl_texts: lines must be bytes");
    data[i] = reinterpret_cast<const uint8_t*>(PyBytes_AS_STRING(item));
    sizes[i] = static_cast<size_t>(PyBytes_GET_SIZE(item));
  }
  const size_t nkeys = keys.size();
  std::vector<uint8_t> ok(n, 0);
  std::vector<ValueRef> values(n * nkeys);
  std::string arena;
  size_t total = 0;
  for (size_t size : sizes) total += size;
  arena.reserve(total);  // decoded strings are never longer than their lines: no reallocation
  {
    py::gil_scoped_release release;  // the bytes objects stay alive: `lines` holds them
    Captures captures;
    captures.keys = &keys;
    for (size_t i = 0; i < n; ++i) {
      if (!valid_utf8(data[i], sizes[i])) continue;
      captures.values.assign(nkeys, StringSpan{});
      captures.state.assign(nkeys, 0);
      LineParser parser(data[i], data[i] + sizes[i]);
      if (!parser.parse_line(captures)) continue;
      bool all_strings = true;
      for (size_t k = 0; k < nkeys; ++k) all_strings = all_strings && captures.state[k] == 1;
      if (!all_strings) continue;
      ok[i] = 1;
      for (size_t k = 0; k < nkeys; ++k) {
        const StringSpan& s = captures.values[k];
        ValueRef& ref = values[i * nkeys + k];
        if (!s.escaped) {
          ref = ValueRef{reinterpret_cast<const char*>(s.data), 0, s.size};
        } else {
          const size_t start = arena.size();
          decode_string(s, arena);
          ref = ValueRef{nullptr, start, arena.size() - start};
        }
      }
    }
  }
  py::list out(n);
  for (size_t i = 0; i < n; ++i) {
    if (!ok[i]) {
      out[i] = py::none();
      continue;
    }
    py::tuple texts(nkeys);
    for (size_t k = 0; k < nkeys; ++k) {
      const ValueRef& ref = values[i * nkeys + k];
      const char* begin = ref.line_data != nullptr ? ref.line_data : arena.data() + ref.offset;
      PyObject* text = PyUnicode_DecodeUTF8(begin, static_cast<Py_ssize_t>(ref.size), "strict");
      if (text == nullptr) throw py::error_already_set();
      texts[k] = py::reinterpret_steal<py::object>(text);
    }
    out[i] = std::move(texts);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_fast, m) {
  m.doc() = "C++ hot loops of the preprocessing pipeline (see csrc/preprocess_fast.cpp)";
  m.def("decode_jsonl_texts", &decode_jsonl_texts, py::arg("lines"), py::arg("keys"),
        "Per line, the tuple of the requested keys' strings, or None where Python must decode the line.");
}
