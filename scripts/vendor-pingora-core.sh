#!/usr/bin/env bash
# Rebuilds vendor/pingora-core from the published pingora-core crate plus our patch
# (vendor/pingora-core.patch), or with --check verifies that the vendored tree is exactly
# that: no unrecorded edits. See vendor/README.md.
#   scripts/vendor-pingora-core.sh           rebuild vendor/pingora-core
#   scripts/vendor-pingora-core.sh --check   verify it (CI)
#   scripts/vendor-pingora-core.sh --diff    regenerate the patch from the vendored tree
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.9.1
SHA256=a535f47f65fdcb003f9e1df04cd18e614c128dfe9388acce3f211ae38ac14d68
URL="https://static.crates.io/crates/pingora-core/pingora-core-$VERSION.crate"
PATCH=vendor/pingora-core.patch
DEST=vendor/pingora-core

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

crate="$work/pingora-core.crate"
cached=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/pingora-core-$VERSION.crate 2>/dev/null | head -1 || true)
if [[ -n "$cached" ]]; then
    cp "$cached" "$crate"
else
    curl -sSfL --retry 3 -o "$crate" "$URL"
fi
echo "$SHA256  $crate" | sha256sum --check --quiet -

mkdir "$work/x"
tar -xzf "$crate" -C "$work/x"
mv "$work/x/pingora-core-$VERSION" "$work/a"

case "${1:-}" in
--diff)
    (cd "$work" && cp -r "$OLDPWD/$DEST" b && diff -ruN a b || true) |
        sed -E 's/^(---|\+\+\+) ([^\t]+)\t.*/\1 \2/' >"$PATCH"
    echo "wrote $PATCH ($(grep -c '^@@' "$PATCH") hunks)"
    ;;
--check)
    (cd "$work/a" && patch -s -p1 <"$OLDPWD/$PATCH")
    if ! diff -r "$work/a" "$DEST" >"$work/report"; then
        cat "$work/report" >&2
        echo "$DEST differs from pingora-core $VERSION + $PATCH;" \
            "record edits with: scripts/vendor-pingora-core.sh --diff" >&2
        exit 1
    fi
    echo "$DEST is pingora-core $VERSION + $PATCH"
    ;;
"")
    (cd "$work/a" && patch -s -p1 <"$OLDPWD/$PATCH")
    rm -rf "$DEST"
    mv "$work/a" "$DEST"
    echo "rebuilt $DEST"
    ;;
*)
    echo "usage: $0 [--check|--diff]" >&2
    exit 2
    ;;
esac
