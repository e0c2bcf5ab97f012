"The report site (`make site`): built from the notebooks, served on localhost and opened in headless Chromium."
import ast, functools, http.server, json, shutil, tempfile, threading, urllib.error, urllib.parse, urllib.request
from pathlib import Path

import pytest

from spseg.cli import build_site, site_pages

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, DRIVER = Path('/usr/bin/chromium'), Path('/usr/bin/chromedriver')
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage', '--window-size=1280,900']

needs_browser = pytest.mark.skipif(not (CHROMIUM.exists() and DRIVER.exists()),
                                   reason='no browser: /usr/bin/chromium and /usr/bin/chromedriver come from the Debian '
                                          'packages chromium and chromium-driver (.ci/run installs them)')


def test_quarto_config_at_top_level():
    "`_quarto.yml` lives at the top of the repository and nbdev 2 finds it where it looks, in `nbs/`, through a link."
    import yaml
    top, link = ROOT/'_quarto.yml', ROOT/'nbs'/'_quarto.yml'
    assert top.is_file() and not top.is_symlink()
    assert link.is_symlink() and link.resolve() == top.resolve()
    cfg = yaml.safe_load(top.read_text())
    assert cfg['project']['type'] == 'website' and 'nbdev.yml' in cfg['metadata-files']


def _mixed_import_cells(nb):
    "Ids of the code cells nbdev runs while building the docs although they hold more than imports."
    ids = []
    for c in json.loads(nb.read_text())['cells']:
        s = ''.join(c['source'])
        if c['cell_type'] != 'code' or 'nbdev_export()' in s or any(l.startswith(('#| export', '#|export')) for l in s.splitlines()):
            continue
        try: body = ast.parse('\n'.join('' if l.lstrip().startswith(('%', '!')) else l for l in s.splitlines())).body
        except SyntaxError: continue
        kinds = [isinstance(n, (ast.Import, ast.ImportFrom)) for n in body]
        if any(kinds) and not all(kinds): ids.append(c.get('id'))
    return ids


def test_imports_alone_in_their_cells():
    """nbdev's docs step (`nbdev_docs`, and `make site` without Quarto) runs every cell that imports, out of order and
    whatever its `#| slow` flag: a cell that imports and also computes fails there or runs a whole experiment.
    Imports go in a cell of their own (nbdev warns "Found cells containing imports and other code")."""
    bad = {nb.name: ids for nb in sorted((ROOT/'nbs').glob('*.ipynb')) if (ids := _mixed_import_cells(nb))}
    assert bad == {}, f'cells mixing imports with other code (move the imports to a cell of their own): {bad}'


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address): pass                 # the browser dropping a connection is not news


@pytest.fixture(scope='module')
def site():
    "The site built offline (no Quarto) into a temporary folder, served on a free localhost port."
    d = Path(tempfile.mkdtemp())
    out = build_site(d/'site', nbs=ROOT/'nbs', quarto=False)
    server = _QuietServer(('127.0.0.1', 0), functools.partial(_QuietHandler, directory=str(out)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield out, f'http://127.0.0.1:{server.server_address[1]}/'
    server.shutdown()
    server.server_close()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope='module')
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp()
    for f in FLAGS + [f'--user-data-dir={profile}']: opts.add_argument(f)
    drv = webdriver.Chrome(service=Service(str(DRIVER)), options=opts)     # Debian's driver: nothing downloaded
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _status(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as r: return r.status
    except urllib.error.HTTPError as e: return e.code


def _nav(browser, base):
    "The pages the home page's navigation lists, in order."
    browser.get(base + 'index.html')
    hrefs = browser.execute_script("return Array.from(document.querySelectorAll('nav.md-nav--primary a.md-nav__link[href]')).map(a => a.href)")
    pages = [urllib.parse.urlsplit(h).path.lstrip('/') for h in hrefs if urllib.parse.urlsplit(h).path.endswith('.html')]
    return list(dict.fromkeys(pages))


def test_one_page_per_notebook(site):
    out, _ = site
    pages = sorted(p.name for p in out.glob('*.html') if p.name != '404.html')
    assert len(pages) == len(site_pages(ROOT/'nbs')) and 'index.html' in pages and 'data.html' in pages   # 00_data → data.html
    assert (out/'search'/'search_index.json').is_file()                  # search is on


@needs_browser
def test_pages_load_with_images_and_links(site, browser):
    "Every page loads with its heading, every image decodes, and every internal link answers 200."
    out, base = site
    pages = _nav(browser, base)
    assert pages[0] == 'index.html' and len(pages) == len(site_pages(ROOT/'nbs')), pages      # home first, every chapter
    links, problems = set(), []
    for page in pages:
        url = base + page
        assert _status(url) == 200, url
        browser.get(url)
        h1 = browser.execute_script("const h = document.querySelector('article h1'); return h ? h.textContent : ''")
        if not h1.strip(): problems.append(f'{page}: no heading')
        if not browser.title.strip(): problems.append(f'{page}: no title')
        broken = browser.execute_script(
            "return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src.slice(0, 80))")
        problems += [f'{page}: image {s} does not load' for s in broken]
        for href in browser.execute_script("return Array.from(document.querySelectorAll('a[href]')).map(a => a.href)"):
            u = urllib.parse.urlsplit(href)
            if u.scheme.startswith('http') and u.netloc == urllib.parse.urlsplit(base).netloc:
                links.add(urllib.parse.urlunsplit(u._replace(fragment='')))
    problems += [f'link {u} answers {s}' for u in sorted(links) if (s := _status(u)) != 200]
    assert problems == [], '\n'.join(problems)


@needs_browser
def test_chapter_shows_prose_figures_and_hides_hidden_cells(site, browser):
    "The data chapter reads as in the notebook: its prose, its figures, its visible code; `#| hide` cells are gone."
    _, base = site
    browser.get(base + 'data.html')                                  # nbs/00_data.ipynb
    assert browser.title.startswith('Data')
    text = browser.execute_script('return document.querySelector("article").innerText')
    assert 'On-disk layout' in text and 'Loading a tissue' in text
    imgs = browser.execute_script(
        "return Array.from(document.querySelectorAll('article img')).filter(i => i.naturalWidth > 100).length")
    assert imgs >= 1
    assert 'from fastcore.test import' not in text                          # the `#| hide` imports
    assert '#| hide' not in text and '#| export' not in text and 'default_exp' not in text
    browser.get(base + 'index.html')
    home = browser.execute_script('return document.querySelector("article").innerText')
    assert 'Install and test' in home and 'from spseg.data import *' not in home     # index.ipynb's `#| hide` cell
