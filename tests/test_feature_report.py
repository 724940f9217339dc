"""The features report (sparse_coding.feature_report): the static HTML escapes every text it shows."""

from sparse_coding.feature_report import render_html


def test_html_escapes_every_text():
    hostile = {"row": 7, "value": 1.5, "token_id": 1, "left": "<img src=x onerror=alert(1)> & ", "token": "</mark><b>",
               "right": " \"q\" 'a'\n"}
    report = {"run_dir": "<run>", "split": "train", "rows_used": 1, "rows_in_split": 1, "top_k": 1, "source": "cache",
              "cache_path": "<c>", "layer": "1", "density_definition": "d", "contexts": "<note>",
              "dictionaries": [{"label": "<lab>", "lam": 0.5, "dict_size": 1, "dead": 0, "dead_fraction": 0.0,
                                "features": [{"index": 0, "density": 1.0, "active_rows": 1, "top": [hostile]}]}]}
    page = render_html(report, b"png")
    for raw in ("<img src=x", "</mark><b>", "<run>", "<lab>", "<note>", "<c>"):
        assert raw not in page
    assert "&lt;img src=x onerror=alert(1)&gt; &amp; <mark>&lt;/mark&gt;&lt;b&gt;</mark>" in page
    assert "&quot;q&quot; &#x27;a&#x27;↵" in page
