"""Downloads one file of a PyPI release by its file name and checks its SHA-256:
`pypi_fetch.py PROJECT FILENAME SHA256 DEST_DIR`. For source packages that `pip download`
would build (it prepares an sdist's metadata, and with --no-binary that means compiling its
build tools from source: cmake, for llama-cpp-python, took over half an hour on CI's two
cores). Reads the simple index pip uses (PIP_INDEX_URL, else pypi.org). Prints the path."""
import hashlib
import os
import re
import sys
import urllib.parse
import urllib.request


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    project, filename, sha256, dest = sys.argv[1:]
    path = os.path.join(dest, filename)
    if os.path.exists(path) and hashlib.sha256(open(path, "rb").read()).hexdigest() == sha256:
        print(path)
        return
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    page_url = f"{index}/{project}/"
    try:
        page = urllib.request.urlopen(page_url, timeout=60).read().decode()
    except OSError as e:
        sys.exit(f"cannot read {page_url}: {e} (network?)")
    links = [urllib.parse.urljoin(page_url, h) for h in re.findall(r'href="([^"]+)"', page)]
    url = next((u for u in links if urllib.parse.urlparse(u).path.endswith("/" + filename)), None)
    if url is None:
        sys.exit(f"{filename} is not listed at {page_url}")
    os.makedirs(dest, exist_ok=True)
    # A name of its own: two make targets run side by side in CI may fetch the same file.
    part = f"{path}.part{os.getpid()}"
    try:
        with urllib.request.urlopen(url.split("#")[0], timeout=600) as r, open(part, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except OSError as e:
        sys.exit(f"cannot download {url}: {e}")
    got = hashlib.sha256(open(part, "rb").read()).hexdigest()
    if got != sha256:
        os.remove(part)
        sys.exit(f"{filename}: SHA-256 {got}, expected {sha256}")
    os.replace(part, path)
    print(path)


if __name__ == "__main__":
    main()
