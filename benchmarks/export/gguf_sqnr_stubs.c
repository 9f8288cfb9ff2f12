#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <stddef.h>
void ggml_abort(const char *file, int line, const char *fmt, ...) { fprintf(stderr, "abort %s:%d\n", file, line); abort(); }
static size_t tsize(int t, size_t *blk) {
  switch (t) { case 2: *blk=32; return 18; case 3: *blk=32; return 20; case 6: *blk=32; return 22; case 7: *blk=32; return 24; case 8: *blk=32; return 34;
    case 10: *blk=256; return 84; case 11: *blk=256; return 110; case 12: *blk=256; return 144; case 13: *blk=256; return 176; case 14: *blk=256; return 210; case 20: *blk=32; return 18; }
  fprintf(stderr, "type %d\n", t); abort();
}
size_t ggml_type_size(int t) { size_t b; return tsize(t, &b); }
size_t ggml_row_size(int t, int64_t ne) { size_t b; size_t s = tsize(t, &b); return s * ne / b; }
const char *ggml_type_name(int t) { return "?"; }
