// What llama.cpp itself says about a text, through its public C API (llama.h), for
// scripts/llamacpp_golden.py, which builds this file against a llama.cpp build's static
// libraries. Nothing here is llama.cpp's code: it only calls the library.
//
//   llamacpp_probe MODEL tokenize FILE     -> "ids ID ID ..." (the text as llama-tokenize gives it:
//                                             the model's BOS rule, special tokens parsed)
//   llamacpp_probe MODEL greedy N K FILE   -> "prompt ID ID ...", then one line per generated
//                                             token: "step ID PIECE ID:LOGIT ..." with llama.cpp's
//                                             K highest logits for that step, best first (PIECE:
//                                             the token's text in hex, "eog" for an end token)
//
// `greedy` runs as llama-simple does: the prompt in one batch, then one token per decode, the
// greedy choice each time, stopping after an end-of-generation token (which is listed) or N
// tokens. Default context parameters (f16 KV cache, flash attention as llama.cpp decides), but
// with PROBE_FLASH_ATTN=off in the environment flash attention is off (its CPU kernel sums V in
// f16: scripts/llamacpp_golden.py records the toys without it, see there).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"

static char *slurp(const char *path, int *len) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        exit(1);
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc(n + 1);
    if (fread(buf, 1, n, f) != (size_t)n) {
        perror(path);
        exit(1);
    }
    buf[n] = 0;
    fclose(f);
    *len = (int)n;
    return buf;
}

static llama_token *tokenize(const struct llama_vocab *vocab, const char *text, int len, int *n) {
    *n = -llama_tokenize(vocab, text, len, NULL, 0, true, true);
    llama_token *ids = malloc(sizeof(llama_token) * (*n + 1));
    if (llama_tokenize(vocab, text, len, ids, *n, true, true) != *n) {
        fprintf(stderr, "tokenize failed\n");
        exit(1);
    }
    return ids;
}

static void quiet(enum ggml_log_level level, const char *text, void *data) {
    (void)level, (void)text, (void)data;
}

static const float *top_logits;
static int by_logit(const void *a, const void *b) {
    float x = top_logits[*(const int *)a], y = top_logits[*(const int *)b];
    return x < y ? 1 : x > y ? -1 : *(const int *)a - *(const int *)b;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL tokenize FILE | MODEL greedy N K FILE\n", argv[0]);
        return 2;
    }
    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    int len, n;
    if (strcmp(argv[2], "tokenize") == 0) {
        char *text = slurp(argv[3], &len);
        llama_token *ids = tokenize(vocab, text, len, &n);
        printf("ids");
        for (int i = 0; i < n; i++) printf(" %d", ids[i]);
        printf("\n");
        return 0;
    }
    if (strcmp(argv[2], "greedy") != 0 || argc < 6) {
        fprintf(stderr, "unknown mode %s\n", argv[2]);
        return 2;
    }
    int n_predict = atoi(argv[3]), k = atoi(argv[4]);
    char *text = slurp(argv[5], &len);
    llama_token *ids = tokenize(vocab, text, len, &n);
    printf("prompt");
    for (int i = 0; i < n; i++) printf(" %d", ids[i]);
    printf("\n");

    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n + n_predict;
    cp.n_batch = n;
    cp.n_threads = cp.n_threads_batch = 2;
    const char *fa = getenv("PROBE_FLASH_ATTN");
    if (fa && strcmp(fa, "off") == 0) cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "cannot make a context\n");
        return 1;
    }
    int n_vocab = llama_vocab_n_tokens(vocab);
    int *order = malloc(sizeof(int) * n_vocab);
    struct llama_batch batch = llama_batch_get_one(ids, n);
    llama_token next;
    for (int step = 0; step < n_predict; step++) {
        if (llama_decode(ctx, batch)) {
            fprintf(stderr, "decode failed at step %d\n", step);
            return 1;
        }
        const float *logits = llama_get_logits_ith(ctx, -1);
        for (int i = 0; i < n_vocab; i++) order[i] = i;
        top_logits = logits;
        qsort(order, n_vocab, sizeof(int), by_logit);
        next = order[0];  // the greedy choice (ties to the lowest id, as llama.cpp's greedy sampler)
        char piece[256];
        int m = llama_token_to_piece(vocab, next, piece, sizeof piece, 0, true);
        int eog = llama_vocab_is_eog(vocab, next);
        printf("step %d ", next);
        if (eog) printf("eog");
        else if (m <= 0) printf("-");
        else for (int i = 0; i < m; i++) printf("%02x", (unsigned char)piece[i]);
        for (int i = 0; i < k; i++) printf(" %d:%.9g", order[i], logits[order[i]]);
        printf("\n");
        if (eog) break;
        batch = llama_batch_get_one(&next, 1);
    }
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
