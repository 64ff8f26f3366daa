# Shared by `scripts/bench` and `scripts/bench-train` (sourced, not run): the --runs/--baseline
# options, building a baseline revision, raw results in bench-results/<bench>.tsv, and the
# median/range summary. Expects `root` (the checkout, physical path) and `PY` to be set.
# shellcheck shell=bash
# root, PY, bench_side and bench_run are the sourcing script's.
# shellcheck disable=SC2154

# PY relative to the checkout still works in the baseline's worktree.
case $PY in
  /*) ;;
  */*) PY=$root/$PY ;;
esac
BENCH_RUNS=${BENCH_RUNS:-5}
BENCH_BASELINE=${BENCH_BASELINE:-}
bench_rest=()

# Takes --runs N and --baseline REV (also --runs=N, --baseline=REV) out of the arguments into
# BENCH_RUNS and BENCH_BASELINE; the other arguments are left in bench_rest.
bench_parse_args() {
  bench_rest=()
  while [ $# -gt 0 ]; do
    case $1 in
      --runs)
        [ $# -ge 2 ] || bench_die "--runs needs a value"
        BENCH_RUNS=$2
        shift 2
        ;;
      --runs=*)
        BENCH_RUNS=${1#--runs=}
        shift
        ;;
      --baseline)
        [ $# -ge 2 ] || bench_die "--baseline needs a revision"
        BENCH_BASELINE=$2
        shift 2
        ;;
      --baseline=*)
        BENCH_BASELINE=${1#--baseline=}
        shift
        ;;
      *)
        bench_rest+=("$1")
        shift
        ;;
    esac
  done
  case $BENCH_RUNS in
    '' | *[!0-9]* | 0) bench_die "--runs wants a positive number, not '$BENCH_RUNS'" ;;
  esac
  export BENCH_RUNS BENCH_BASELINE
}

bench_die() {
  echo "bench: $*" >&2
  exit 1
}

# What the raw results record about this invocation: the commit measured (with -dirty when the
# working tree differs from it; bench-results/ itself does not count), the machine, and the start.
bench_identify() {
  bench_commit=$(git -C "$root" rev-parse HEAD)
  bench_commit_short=${bench_commit:0:12}
  if [ -n "$(git -C "$root" status --porcelain -- . ':(exclude)bench-results' 2>/dev/null)" ]; then
    bench_commit=$bench_commit-dirty
    bench_commit_short=$bench_commit_short-dirty
  fi
  bench_host=$(hostname 2>/dev/null || cat /proc/sys/kernel/hostname)
  bench_nproc=$(nproc)
  bench_cpu=$(sed -n 's/^model name[[:space:]]*:[[:space:]]*//p' /proc/cpuinfo | head -n1 | tr '\t' ' ')
  bench_cpu=${bench_cpu:-unknown}
}

# bench_record BENCH COLUMNS VALUE...: appends one run to bench-results/BENCH.tsv, creating the
# file with a header line first. COLUMNS names the bench-specific columns (space-separated), one
# VALUE each; the common columns come from bench_identify, bench_side, bench_run, bench_base_sha.
bench_record() {
  local bench=$1 columns=$2 file=$root/bench-results/$1.tsv IFS=$'\t'
  shift 2
  mkdir -p "$root/bench-results"
  if [ ! -s "$file" ]; then
    printf 'time_utc\tbench\tside\tcommit\tbaseline\trun\t%s\thost\tnproc\tcpu\n' "${columns// /$'\t'}" >"$file"
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$bench" \
    "$bench_side" "$bench_commit" "${bench_base_sha:--}" "$bench_run" "$*" "$bench_host" "$bench_nproc" \
    "$bench_cpu" >>"$file"
}

# Reads `cargo --message-format=json` from stdin; prints the executable of target NAME.
bench_cargo_executable() {
  "$PY" -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[1] and m.get("executable"):
        print(m["executable"])
' "$1" | tail -n1
}

# bench_build_baseline REV WHAT...: release binaries of git revision REV, built once per commit and
# kept in run/bench-base/<sha>/bin. WHAT is `bins` (coordinator and worker) and/or `allreduce` (the
# all-reduce bench). REV is checked out with `git worktree add` and built with the shared target
# directory and the same LIBTORCH as this checkout, so registry dependencies are not rebuilt; the
# binaries are copied out at once (the next build of this checkout puts its own back in
# target/release) and the worktree is removed. Sets bench_base_sha and bench_base_bin.
bench_build_baseline() {
  local rev=$1 what need=() wt status=0 target
  shift
  bench_base_sha=$(git -C "$root" rev-parse --verify --quiet "$rev^{commit}") ||
    bench_die "--baseline: '$rev' is not a commit"
  bench_base_bin=$root/run/bench-base/$bench_base_sha/bin
  for what in "$@"; do
    case $what in
      bins) [ -x "$bench_base_bin/coordinator" ] && [ -x "$bench_base_bin/worker" ] || need+=(bins) ;;
      allreduce) [ -x "$bench_base_bin/allreduce" ] || need+=(allreduce) ;;
    esac
  done
  if [ ${#need[@]} -gt 0 ]; then
    echo "== baseline: building $rev (${bench_base_sha:0:12}) in release: ${need[*]} =="
    target=${CARGO_TARGET_DIR:-$root/target}
    wt=$root/run/bench-base/$bench_base_sha/src
    mkdir -p "$bench_base_bin"
    git -C "$root" worktree remove --force "$wt" >/dev/null 2>&1 || rm -rf "$wt"
    git -C "$root" worktree prune
    git -C "$root" worktree add --quiet --detach "$wt" "$bench_base_sha"
    ln -sfn "$root/.libtorch" "$wt/.libtorch"
    # `set -e` does not reach into a subshell whose status is tested: each step checks its own.
    (
      cd "$wt" || exit
      # The value this checkout's .cargo/config.toml gives, so torch-sys is not rebuilt.
      libtorch=${LIBTORCH:-$root/.libtorch}
      for what in "${need[@]}"; do
        case $what in
          bins)
            CARGO_TARGET_DIR=$target LIBTORCH=$libtorch cargo build --release --locked --bins \
              --message-format=json-render-diagnostics >"$wt/bins.json" || exit
            for b in coordinator worker; do
              exe=$(bench_cargo_executable "$b" <"$wt/bins.json")
              [ -n "$exe" ] || bench_die "baseline: no $b binary in the build output"
              cp -f "$exe" "$bench_base_bin/$b.tmp" || exit
              mv -f "$bench_base_bin/$b.tmp" "$bench_base_bin/$b" || exit
            done
            ;;
          allreduce)
            CARGO_TARGET_DIR=$target LIBTORCH=$libtorch cargo bench --no-run --locked \
              -p ringmaster-worker --bench allreduce --message-format=json-render-diagnostics >"$wt/bench.json" || exit
            exe=$(bench_cargo_executable allreduce <"$wt/bench.json")
            [ -n "$exe" ] || bench_die "baseline: no allreduce bench in the build output"
            cp -f "$exe" "$bench_base_bin/allreduce.tmp" || exit
            mv -f "$bench_base_bin/allreduce.tmp" "$bench_base_bin/allreduce" || exit
            ;;
        esac
      done
    ) || status=$?
    git -C "$root" worktree remove --force "$wt" >/dev/null 2>&1 || rm -rf "$wt"
    git -C "$root" worktree prune
    # Cargo hashes a workspace crate by its path relative to the workspace, so the worktree's
    # crates shared this checkout's artifacts, build-script outputs included (generated protobuf
    # code), and a fingerprint can look fresh over them. Forget them all: this checkout's next
    # build recompiles its own crates (not the registry dependencies).
    rm -rf "$target"/release/build/ringmaster-* "$target"/release/.fingerprint/ringmaster-*
    [ "$status" -eq 0 ] || bench_die "baseline: building $rev failed"
  else
    echo "== baseline: $rev (${bench_base_sha:0:12}), cached in run/bench-base/$bench_base_sha/bin =="
  fi
  # The worker's RUNPATH starts with $ORIGIN/libtorch/lib; the bench's points into target/, so
  # it runs with LD_LIBRARY_PATH (bench_base_env).
  ln -sfn "$root/.libtorch" "$bench_base_bin/libtorch"
}

# Runs a baseline executable with libtorch on the loader's path.
bench_base_env() {
  LD_LIBRARY_PATH=$bench_base_bin/libtorch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} "$@"
}

# bench_summary FILE TITLE PEER PEER_LABEL DECIMALS [lower]: FILE holds `label<TAB>side<TAB>value`
# lines, one per run (side: ringmaster, baseline or PEER). Prints, per label, each side's median and
# range (min-max) over its runs, then the ratios of medians ringmaster/PEER and ringmaster/baseline;
# with `lower` (the values are times: lower is better), PEER/ringmaster and baseline/ringmaster.
bench_summary() {
  local base_label="" inverse=0
  [ "${6:-}" = lower ] && inverse=1
  [ -n "${bench_base_sha:-}" ] && base_label="baseline ${bench_base_sha:0:12}"
  echo "== $2: median and range (min-max) of $BENCH_RUNS runs each, interleaved =="
  awk -F'\t' -v peer="$3" -v peer_label="$4" -v base_label="$base_label" -v d="$5" -v inv="$inverse" '
    !($1 in seen) { seen[$1] = 1; labels[nl++] = $1 }
    { k = $1 SUBSEP $2; cnt[k]++; val[k, cnt[k]] = $3 }
    # Sorts the values of key k into s[1..m]; returns m.
    function sorted(k,   m, i, j, t) {
      m = cnt[k]
      for (i = 1; i <= m; i++) s[i] = val[k, i] + 0
      for (i = 2; i <= m; i++)
        for (j = i; j > 1 && s[j - 1] > s[j]; j--) { t = s[j]; s[j] = s[j - 1]; s[j - 1] = t }
      return m
    }
    function row(l, side, name,   k, m) {
      k = l SUBSEP side
      if (!(k in cnt)) return
      m = sorted(k)
      med[k] = (m % 2) ? s[(m + 1) / 2] : (s[m / 2] + s[m / 2 + 1]) / 2
      printf "%-10s  %-24s %12.*f   %.*f-%.*f\n", l, name, d, med[k], d, s[1], d, s[m]
    }
    function ratio(l, a, b, name,   ka, kb) {
      ka = l SUBSEP a; kb = l SUBSEP b
      if (!(ka in med) || !(kb in med)) return
      printf "%-10s  %-24s %12s\n", l, name, (med[kb] > 0) ? sprintf("%.2fx", med[ka] / med[kb]) : "n/a"
    }
    END {
      printf "%-10s  %-24s %12s   %s\n", "", "", "median", "range"
      for (i = 0; i < nl; i++) {
        l = labels[i]
        row(l, "ringmaster", "ringmaster")
        row(l, "baseline", base_label)
        row(l, peer, peer_label)
        if (inv) {
          ratio(l, peer, "ringmaster", peer " / ringmaster")
          ratio(l, "baseline", "ringmaster", "baseline / ringmaster")
          continue
        }
        ratio(l, "ringmaster", peer, "ringmaster / " peer)
        ratio(l, "ringmaster", "baseline", "ringmaster / baseline")
      }
    }' "$1"
}
