"""Encode speed and exactness of RWKV World tokenizer implementations.

    python bench/bench_tokenizer.py [--mb 4] [--repeats 3] [--fuzz 20000]

Builds a deterministic mixed corpus (English-like prose, code, Chinese, Japanese, Russian,
emoji, random code points, whitespace runs), encodes it with each implementation that is
installed, and prints a markdown table: build time, encode MB/s (best of --repeats, wall
clock, one thread) and whether the ids are identical to the official `rwkv` package's
TRIE_TOKENIZER on the whole corpus, on edge cases and on --fuzz short strings (random
slices, 1-256 characters, of a second corpus with another seed). Implementations that accept bytes are
also checked on invalid UTF-8. Build time and resident memory added by the build are
measured in a fresh process per implementation. Candidates:

  rwkv TRIE_TOKENIZER       the official reference (rwkv/rwkv_tokenizer.py), slow
  WorldTokenizer python     this project's pure-Python encoder
  pyrwkv-tokenizer          Rust, if installed
  rwkv-tokenizer            Rust, if installed (e.g. pip install --target DIR the 0.5.2
                            wheel and run with PYTHONPATH=DIR)
  WorldTokenizer default    this project's tokenizer as used (pyrwkv-tokenizer if installed)
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import random
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv_peft.data.tokenizer import WorldTokenizer, find_world_vocab  # noqa: E402

# ----------------------------------------------------------------------------------------
# corpus

_EN_WORDS = """the of and to a in is that it was for on are as with his they at be this
from have or by one had not but what all were when we there can an your which their said if
do will each about how up out them then she many some so these would other into has more her
two like him see time could no make than first been its who now people my made over did down
only way find use may water long little very after words called just where most know get
through back much before go good new write our used me man too any day same right look think
also around another came come work three word must because does part even place well such
here take why things help put years different away again off went old number great tell men
say small every found still between name should home big give air line set own under read
last never us left end along while might next sound below saw something thought both few
those always looked show large often together asked house world going want school important
until form food keep children feet land side without boy once animals life enough took
sometimes four head above kind began almost live page got earth need far hand high year
mother light parts country father let night following picture being study second eyes soon
times story boys since white days ever paper hard near sentence better best across during
today others however sure means knew try told young miles sun ways thing whole hear example
heard several change answer room sea against top turned learn point city play toward five
using himself usually model training data loss gradient learning rate layer token sequence
weights adapter matrix rank memory state network language""".split()

_CODE_WORDS = """self x y i j k n idx batch model state tokens ids logits loss optimizer config
args kwargs result value key item data path name size shape dtype device weight bias lr step
epoch out hidden head layer block attn ffn mask scale eps norm grad params buffer cache""".split()

_ZH = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能"
    "下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量"
    "都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各"
    "重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代"
    "想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接"
    "知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处队南给色光门即保治北"
    "造百规热领七海口东导器压志世金增争济阶油思术极交受联什认六共权收证改清己美再采转更单风切打"
    "白教速花带安场身车例真务具万每目至达走积示议声报斗完类八离华名确才科张信马节话米整空元况今"
    "集温传土许步群广石记需段研界拉林律叫且究观越织装影算低持音众书布复容儿须际商非验连断深难近"
    "矿千周委素技备半办青省列习响约支般史感劳便团往酸历市克何除消构府称太准精值号率族维划选标写"
    "存候毛亲快效斯院查江型眼王按格养易置派层片始却专状育厂京识适属圆包火住调满县局照参红细引听"
    "该铁价严模型训练数据学习率梯度损失参数矩阵"
)
_ZH_PUNCT = "，，，。、；：！？“”（）《》"
_JA = "これはテストの文章ですわたしはにほんごをべんきょうしていますカタカナひらがな漢字東京大学"
_RU_WORDS = "и в не на я быть он с что а по это она этот к но они мы как из у который то за свой".split()
_EMOJI = "😀😃😄😁😆😅🤣😂🙂🙃😉😊😇🥰😍🤩😘🎉🎊🔥✨👍👎👏🙏💪🚀🌍🌟⭐❤️💔🇺🇸🇨🇳🇯🇵👨‍👩‍👧‍👦🏳️‍🌈"


def _zipf_pick(rng: random.Random, items: list, n: int, s: float = 1.1) -> list:
    weights = [1.0 / (r + 1) ** s for r in range(len(items))]
    return rng.choices(items, weights=weights, k=n)


def _pseudo_words(rng: random.Random, n: int) -> list[str]:
    sy = "ba be bi bo ta te ti to ra re ri ro sa se si so na ne ni no la le li lo ma me mi mo".split()
    sy += "str pl tr ch sh th ing tion ed er ly ous al ent".split()
    return ["".join(rng.choice(sy) for _ in range(rng.randint(1, 4))) for _ in range(n)]


def _english(rng: random.Random, nbytes: int) -> str:
    vocab = _EN_WORDS + _pseudo_words(rng, 20000)  # common words first, long tail after
    out, size = [], 0
    while size < nbytes:
        para = []
        for _ in range(rng.randint(2, 8)):
            words = _zipf_pick(rng, vocab, rng.randint(4, 25))
            if rng.random() < 0.1:
                words.insert(rng.randrange(len(words)), str(rng.randint(0, 10**rng.randint(1, 6))))
            sent = " ".join(words)
            sent = sent[0].upper() + sent[1:]
            if rng.random() < 0.3:
                k = sent.find(" ", len(sent) // 2)
                if k > 0:
                    sent = sent[:k] + "," + sent[k:]
            para.append(sent + rng.choice(".....?!;:"))
        text = " ".join(para) + rng.choice(["\n\n", "\n", "\n\n\n", "  \n\n"])
        out.append(text)
        size += len(text)
    return "".join(out)


def _code(rng: random.Random, nbytes: int) -> str:
    out, size = [], 0
    while size < nbytes:
        name = "_".join(_zipf_pick(rng, _CODE_WORDS, rng.randint(1, 3)))
        args = ", ".join(_zipf_pick(rng, _CODE_WORDS, rng.randint(0, 4)))
        lines = [f"def {name}({args}):", f'    """{" ".join(_zipf_pick(rng, _EN_WORDS, 8))}."""']
        for _ in range(rng.randint(2, 12)):
            ind = " " * (4 * rng.randint(1, 4))
            a, b, c = _zipf_pick(rng, _CODE_WORDS, 3)
            lines.append(
                rng.choice(
                    [
                        f"{ind}{a} = {b}.{c}({rng.randint(0, 999)})",
                        f"{ind}if {a} is not None and {b}[{c}] >= {rng.random():.4f}:",
                        f"{ind}for {a} in range(len({b})):",
                        f"{ind}{a}[{b}] += {c} * 0x{rng.getrandbits(16):04x}",
                        f"{ind}return {{'{a}': {b}, '{c}': [1, 2, 3]}}",
                        f"{ind}# {' '.join(_zipf_pick(rng, _EN_WORDS, 6))}",
                        f"{ind}{a}.{b} = torch.zeros({rng.randint(1, 64)}, {rng.randint(1, 4096)})",
                        f"\t{a}->{b} = ({c} << 3) | 0xff;  /* {b} */",
                        "",
                    ]
                )
            )
        text = "\n".join(lines) + "\n\n"
        out.append(text)
        size += len(text)
    return "".join(out)


def _cjk_and_others(rng: random.Random, nbytes: int) -> str:
    zh = list(_ZH)
    out, size = [], 0
    while size < nbytes:
        r = rng.random()
        if r < 0.7:
            text = "".join(_zipf_pick(rng, zh, rng.randint(5, 40), 0.9)) + rng.choice(_ZH_PUNCT)
        elif r < 0.8:
            text = "".join(rng.choice(_JA) for _ in range(rng.randint(5, 30))) + "。"
        elif r < 0.9:
            text = " ".join(_zipf_pick(rng, _RU_WORDS, rng.randint(3, 15))).capitalize() + ". "
        else:
            text = "\n\n" if rng.random() < 0.5 else " "
        out.append(text)
        size += len(text.encode("utf-8"))
    return "".join(out)


def _emoji_and_random(rng: random.Random, nbytes: int) -> str:
    out, size = [], 0
    while size < nbytes:
        r = rng.random()
        if r < 0.4:
            text = "".join(rng.choice(_EMOJI) for _ in range(rng.randint(1, 6))) + " "
        elif r < 0.7:  # random code points, any plane, no surrogates
            cps = [rng.randrange(0x110000) for _ in range(rng.randint(1, 20))]
            text = "".join(chr(c) for c in cps if not 0xD800 <= c < 0xE000)
        elif r < 0.9:  # random bytes seen as latin-1 text
            text = bytes(rng.randrange(256) for _ in range(rng.randint(1, 40))).decode("latin-1")
        else:  # whitespace runs
            text = rng.choice([" ", "\t", "\n", "\r\n", "\u3000"]) * rng.randint(1, 300)
        out.append(text)
        size += len(text.encode("utf-8"))
    return "".join(out)


def build_corpus(mb: float, seed: int = 20230424) -> str:
    """Deterministic mixed text of about `mb` MB of UTF-8."""
    rng = random.Random(seed)
    n = int(mb * 1e6)
    parts = [
        _english(rng, int(n * 0.40)),
        _code(rng, int(n * 0.25)),
        _cjk_and_others(rng, int(n * 0.25)),
        _emoji_and_random(rng, int(n * 0.10)),
    ]
    # Interleave blocks so that no implementation sees one language for megabytes.
    blocks = []
    for p in parts:
        step = 20000
        blocks += [p[i : i + step] for i in range(0, len(p), step)]
    rng.shuffle(blocks)
    return "".join(blocks)


def edge_cases() -> list[str]:
    cases = ["", "\n", "\n\n", "\n\n\n\n", "\r\n\r\n", " ", "\t\t", "\u3000\u3000", "\x00", "a"]
    cases += [" " * n for n in (2, 3, 15, 16, 17, 127, 128, 129, 255, 256, 1000)]
    cases += ["\n" * n for n in (3, 7, 64, 65)] + ["-" * 81, "#" * 200, "=" * 300]
    cases += ["The Eiffel tower is in the city of", "User: hi\n\nAssistant:", "😀" * 9]
    cases += ["👨‍👩‍👧‍👦🏳️‍🌈", "日本語のテキスト", "Привет, мир!", "a\u0301\u200b\ufeffz", "\U0010ffff"]
    return cases


def fuzz_cases(n: int, seed: int = 99) -> list[str]:
    """n short strings that start and end anywhere: inside words, runs, emoji sequences."""
    if n <= 0:
        return []  # building the second corpus takes a while: skip it when nothing is drawn from it
    rng = random.Random(seed)
    text = build_corpus(1.0, seed=seed)
    starts = [rng.randrange(len(text)) for _ in range(n)]
    return [text[i : i + rng.randint(1, 256)] for i in starts]


def invalid_utf8_cases(rng: random.Random) -> list[bytes]:
    cases = [b"\xff", b"\xc3", b"\xe4\xbd", b"\x80\x80", b"abc\xff\xfe def", "é".encode()[:1] * 9]
    cases += [bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))) for _ in range(200)]
    cases.append(bytes(rng.randrange(256) for _ in range(200_000)))
    return cases


# ----------------------------------------------------------------------------------------
# candidates: name -> (label, build function returning (encode_str, encode_bytes or None))


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def _ours_python():
    tok = WorldTokenizer(backend="python")
    return tok.encode, tok.encode_bytes


def _ours_default():
    tok = WorldTokenizer()
    return tok.encode, tok.encode_bytes


def _pyrwkv():
    import pyrwkv_tokenizer

    tok = pyrwkv_tokenizer.WorldTokenizer(str(find_world_vocab()))
    return tok.encode, None


def _rwkv_tokenizer():
    import rwkv_tokenizer

    tok = rwkv_tokenizer.WorldTokenizer(str(find_world_vocab()))
    return tok.encode, None


def _reference():
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER  # plain module, no rwkv.model side effects

    tok = TRIE_TOKENIZER(str(find_world_vocab()))
    return tok.encode, tok.encodeBytes


def candidates() -> dict[str, tuple[str, object]]:
    found = {"reference": ("rwkv TRIE_TOKENIZER (official reference)", _reference)}
    found["python"] = ("rwkv_peft WorldTokenizer, backend='python'", _ours_python)
    for dist, module, fn in [("pyrwkv-tokenizer", "pyrwkv_tokenizer", _pyrwkv), ("rwkv-tokenizer", "rwkv_tokenizer", _rwkv_tokenizer)]:
        if importlib.util.find_spec(module) is None:
            print(f"{dist} not installed, skipped", file=sys.stderr)
        else:
            found[module] = (f"{dist} {_version(dist)} (Rust)", fn)
    found["default"] = ("rwkv_peft WorldTokenizer, default backend", _ours_default)
    return found


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def measure_build(name: str) -> None:
    """Run in a fresh process: print build seconds and resident memory added by the build."""
    label, build = candidates()[name]
    gc.collect()
    before = _rss_mb()
    t = time.perf_counter()
    keep = build()
    secs = time.perf_counter() - t
    gc.collect()
    print(json.dumps({"build_s": secs, "rss_mb": _rss_mb() - before}))
    del keep


def build_cost(name: str) -> tuple[float, float]:
    try:
        res = subprocess.run(
            [sys.executable, __file__, "--measure-build", name], capture_output=True, text=True, check=True
        )
        d = json.loads(res.stdout.strip().splitlines()[-1])
        return d["build_s"], d["rss_mb"]
    except (subprocess.CalledProcessError, ValueError, IndexError, OSError):
        return float("nan"), float("nan")


def _timed(fn, arg, repeats: int) -> tuple[float, list[int]]:
    best, ids = float("inf"), None
    for _ in range(repeats):
        gc.collect()
        t = time.perf_counter()
        ids = fn(arg)
        best = min(best, time.perf_counter() - t)
    return best, ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=4.0, help="corpus size in MB (default 4)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs, best kept (default 3)")
    ap.add_argument("--fuzz", type=int, default=20000, help="short random strings compared (default 20000)")
    ap.add_argument("--measure-build", metavar="NAME", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure_build:
        measure_build(args.measure_build)
        return

    corpus = build_corpus(args.mb)
    nbytes = len(corpus.encode("utf-8"))
    edges, bad, fuzz = edge_cases(), invalid_utf8_cases(random.Random(7)), fuzz_cases(args.fuzz)
    print(
        f"corpus: {nbytes / 1e6:.2f} MB UTF-8, {len(corpus):,} chars; Python {platform.python_version()} "
        f"{platform.machine()}, {os.cpu_count()} CPUs; best of {args.repeats}",
        file=sys.stderr,
    )

    found = candidates()
    ref_ids = ref_edges = ref_bad = ref_fuzz = None
    rows = []
    for name, (label, build) in found.items():
        print(f"running {label} ...", file=sys.stderr)
        build_s, rss = build_cost(name)
        enc, enc_bytes = build()
        if name == "default":
            label += f" (= {enc.__self__.backend})"
        secs, ids = _timed(enc, corpus, args.repeats)
        if name == "reference":
            ref_ids, ref_edges, ref_bad = ids, [enc(s) for s in edges], [enc_bytes(b) for b in bad]
            ref_fuzz = [enc(s) for s in fuzz]
            rows.append((label, build_s, rss, nbytes / secs / 1e6, "(reference)", "(reference)", "yes"))
            continue
        same = ids == ref_ids
        if not same:
            k = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), min(len(ids), len(ref_ids)))
            print(f"{label}: corpus ids differ from the reference at token {k}", file=sys.stderr)
        for s, want in zip(edges, ref_edges):
            try:
                got = enc(s)
            except BaseException as e:  # noqa: BLE001 - Rust panics are BaseException
                got = f"error {type(e).__name__}"
            if got != want:
                same = False
                print(f"{label}: differs on {s[:20]!r}: {str(got)[:60]} vs {want[:8]}", file=sys.stderr)
        fuzz_same = sum(enc(s) == want for s, want in zip(fuzz, ref_fuzz))
        same = same and fuzz_same == len(fuzz)
        if enc_bytes is None:
            bytes_ok = "no (str only)"
        else:
            bytes_ok = "yes" if all(enc_bytes(b) == want for b, want in zip(bad, ref_bad)) else "DIFFERENT"
            same = same and bytes_ok == "yes"
        rows.append((label, build_s, rss, nbytes / secs / 1e6, "yes" if same else "no",
                     f"{fuzz_same:,}/{len(fuzz):,}", bytes_ok))
        del enc, enc_bytes
        gc.collect()

    print(f"\nWorld tokenizer encode speed: {nbytes / 1e6:.2f} MB mixed corpus, best of {args.repeats}, one thread")
    print("(build time and memory measured in a fresh process each)\n")
    print("| implementation | build (s) | build memory (MB) | encode MB/s | identical ids | fuzz strings identical "
          "| invalid UTF-8 bytes input |")
    print("|---|---:|---:|---:|---|---:|---|")
    for label, build_s, rss, mbs, same, fuzz_same, b in rows:
        print(f"| {label} | {build_s:.2f} | {rss:.0f} | {mbs:.2f} | {same} | {fuzz_same} | {b} |")


if __name__ == "__main__":
    main()
