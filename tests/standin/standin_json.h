/*
 * standin_json.h - a small JSON reader for the stand-in's trace replay (tests/standin/rkllm_standin.c).
 *
 * Reads a whole document into a tree of JVal (never freed: a replayed trace lives as long as the
 * process). Numbers are doubles; strings are NUL-terminated UTF-8 (\uXXXX escapes and surrogate
 * pairs are decoded). On a syntax error jparse returns NULL and writes the byte offset to *err_at.
 */
#ifndef STANDIN_JSON_H
#define STANDIN_JSON_H

#include <ctype.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

typedef enum { J_NULL, J_BOOL, J_NUM, J_STR, J_ARR, J_OBJ } JType;

typedef struct JVal {
    JType t;
    bool b;
    double num;
    char *str;           /* J_STR */
    size_t n;            /* J_ARR / J_OBJ: number of items */
    struct JVal **items; /* J_ARR / J_OBJ: values */
    char **keys;         /* J_OBJ: keys */
} JVal;

typedef struct {
    const char *s;
    size_t i, len;
    int depth;
} JParser;

static JVal *jp_value(JParser *p);

static void jp_ws(JParser *p) {
    while (p->i < p->len && isspace((unsigned char)p->s[p->i])) p->i++;
}

static JVal *jp_new(JType t) {
    JVal *v = calloc(1, sizeof *v);
    if (v) v->t = t;
    return v;
}

static bool jp_lit(JParser *p, const char *word) {
    size_t n = strlen(word);
    if (p->len - p->i < n || strncmp(p->s + p->i, word, n) != 0) return false;
    p->i += n;
    return true;
}

static int jp_hex4(JParser *p) {
    if (p->len - p->i < 4) return -1;
    int v = 0;
    for (int k = 0; k < 4; k++) {
        char c = p->s[p->i + k];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= c - '0';
        else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
        else return -1;
    }
    p->i += 4;
    return v;
}

static size_t jp_utf8(char *out, unsigned cp) {
    if (cp < 0x80) { out[0] = (char)cp; return 1; }
    if (cp < 0x800) { out[0] = (char)(0xC0 | cp >> 6); out[1] = (char)(0x80 | (cp & 0x3F)); return 2; }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | cp >> 12); out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F)); return 3;
    }
    out[0] = (char)(0xF0 | cp >> 18); out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* p->i is just past the opening quote. The decoded string is never longer than its source. */
static char *jp_string_body(JParser *p) {
    char *out = malloc(p->len - p->i + 1);
    if (!out) return NULL;
    size_t n = 0;
    while (p->i < p->len) {
        char c = p->s[p->i++];
        if (c == '"') { out[n] = '\0'; return out; }
        if ((unsigned char)c < 0x20) break;
        if (c != '\\') { out[n++] = c; continue; }
        if (p->i >= p->len) break;
        char e = p->s[p->i++];
        switch (e) {
        case '"': case '\\': case '/': out[n++] = e; break;
        case 'b': out[n++] = '\b'; break;
        case 'f': out[n++] = '\f'; break;
        case 'n': out[n++] = '\n'; break;
        case 'r': out[n++] = '\r'; break;
        case 't': out[n++] = '\t'; break;
        case 'u': {
            int cp = jp_hex4(p);
            if (cp < 0) goto fail;
            if (cp >= 0xD800 && cp < 0xDC00 && jp_lit(p, "\\u")) {
                int lo = jp_hex4(p);
                if (lo < 0xDC00 || lo >= 0xE000) goto fail;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            n += jp_utf8(out + n, (unsigned)cp);
            break;
        }
        default: goto fail;
        }
    }
fail:
    free(out);
    return NULL;
}

static JVal *jp_container(JParser *p, bool object) {
    JVal *v = jp_new(object ? J_OBJ : J_ARR);
    size_t cap = 0;
    if (!v) return NULL;
    p->i++; /* '[' or '{' */
    jp_ws(p);
    if (p->i < p->len && p->s[p->i] == (object ? '}' : ']')) { p->i++; return v; }
    for (;;) {
        char *key = NULL;
        jp_ws(p);
        if (object) {
            if (p->i >= p->len || p->s[p->i] != '"') return NULL;
            p->i++;
            key = jp_string_body(p);
            jp_ws(p);
            if (!key || p->i >= p->len || p->s[p->i] != ':') return NULL;
            p->i++;
        }
        JVal *item = jp_value(p);
        if (!item) return NULL;
        if (v->n == cap) {
            cap = cap ? cap * 2 : 8;
            v->items = realloc(v->items, cap * sizeof *v->items);
            if (object) v->keys = realloc(v->keys, cap * sizeof *v->keys);
            if (!v->items || (object && !v->keys)) return NULL;
        }
        v->items[v->n] = item;
        if (object) v->keys[v->n] = key;
        v->n++;
        jp_ws(p);
        if (p->i >= p->len) return NULL;
        char c = p->s[p->i++];
        if (c == ',') continue;
        if (c == (object ? '}' : ']')) return v;
        return NULL;
    }
}

static JVal *jp_value(JParser *p) {
    if (++p->depth > 64) return NULL;
    jp_ws(p);
    JVal *v = NULL;
    if (p->i >= p->len) return NULL;
    char c = p->s[p->i];
    if (c == '{' || c == '[') {
        v = jp_container(p, c == '{');
    } else if (c == '"') {
        p->i++;
        char *s = jp_string_body(p);
        if (s && (v = jp_new(J_STR))) v->str = s;
    } else if (jp_lit(p, "true")) {
        if ((v = jp_new(J_BOOL))) v->b = true;
    } else if (jp_lit(p, "false")) {
        v = jp_new(J_BOOL);
    } else if (jp_lit(p, "null")) {
        v = jp_new(J_NULL);
    } else {
        char *end;
        double d = strtod(p->s + p->i, &end);
        if (end != p->s + p->i && (v = jp_new(J_NUM))) {
            v->num = d;
            p->i = (size_t)(end - p->s);
        }
    }
    p->depth--;
    return v;
}

static JVal *jparse(const char *text, size_t len, size_t *err_at) {
    JParser p = {text, 0, len, 0};
    JVal *v = jp_value(&p);
    jp_ws(&p);
    if (!v || p.i != p.len) {
        if (err_at) *err_at = p.i;
        return NULL;
    }
    return v;
}

/* Member `key` of an object (NULL when absent or not an object). */
static JVal *jget(const JVal *obj, const char *key) {
    if (!obj || obj->t != J_OBJ) return NULL;
    for (size_t k = 0; k < obj->n; k++)
        if (strcmp(obj->keys[k], key) == 0) return obj->items[k];
    return NULL;
}

static double jnum(const JVal *v, double def) {
    return v && v->t == J_NUM ? v->num : def;
}

static const char *jstr(const JVal *v) {
    return v && v->t == J_STR ? v->str : NULL;
}

#endif
