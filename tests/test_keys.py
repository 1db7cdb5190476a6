"""Keys and wire values: Segment's snake_case and Amberflo's dimension rule."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pandas as pd
import pytest

from sync.keys import dimension_safe, format_value, snake_case, wire_value

# segmentio/go-snakecase's own test table, then the names the Segment docs show.
GO_SNAKECASE_TABLE = [
    ("sample text", "sample_text"),
    ("sample-text", "sample_text"),
    ("sample_text", "sample_text"),
    ("sample___text", "sample_text"),
    ("sampleText", "sample_text"),
    ("inviteYourCustomersAddInvites", "invite_your_customers_add_invites"),
    ("sample 2 Text", "sample_2_text"),
    ("   sample   2    Text   ", "sample_2_text"),
    ("   $#$sample   2    Text   ", "sample_2_text"),
    ("SAMPLE 2 TEXT", "sample_2_text"),
    ("___$$Base64Encode", "base64_encode"),
    ("FOO:BAR$BAZ", "foo_bar_baz"),
    ("FOO#BAR#BAZ", "foo_bar_baz"),
    ("something.com", "something_com"),
    ("$something%", "something"),
    ("•¶§ƒ˚foo˙∆˚¬", "foo"),
]
SEGMENT_DOC_NAMES = [
    ("Order Completed Last 30 Days", "order_completed_last_30_days"),
    ("Email Opened 30 Days", "email_opened_30_days"),
    ("Vanessa GA test", "vanessa_ga_test"),
    ("Last Product Viewed Item", "last_product_viewed_item"),
    ("Dormant Shoppers", "dormant_shoppers"),
    ("VIP users (EU)", "vip_users_eu"),
    ("first-time shopper", "first_time_shopper"),
    ("Users: 2+ orders", "users_2_orders"),
]
# Quirks of the Go code that must be reproduced, not "fixed": they are the keys Segment wrote.
GO_QUIRKS = [
    ("HTTPServerErrors", "httpserver_errors"),
    ("last30Days", "last3_0days"),
    ("café lovers", "caf_lovers"),
]


@pytest.mark.parametrize(("name", "key"), GO_SNAKECASE_TABLE + SEGMENT_DOC_NAMES + GO_QUIRKS)
def test_snake_case_matches_go_snakecase(name: str, key: str) -> None:
    """Audience and trait names become the keys Segment's go-snakecase makes."""
    assert snake_case(name) == key


@pytest.mark.parametrize(
    ("raw", "wire"),
    [
        ("Welcome | Initech", "Welcome _ Initech"),
        ("https://google.com", "https:__google.com"),
        ("/home", "_home"),
        ("paper,comedy", "paper,comedy"),
        ("650-769-3240", "650-769-3240"),
        (
            "https://s3.amazonaws.com/uifaces/faces/twitter/scottkclark/128.jpg",
            "https:__s3.amazonaws.com_uifaces_faces_twitter_scottkclark_128.jpg",
        ),
        ("aflo.cancel_previous_resource_event", "aflo.cancel_previous_resource_event"),
        ("100%", "100_"),
        ("naïve", "na_ve"),
    ],
)
def test_dimension_rule_reproduces_destination_examples(raw: str, wire: str) -> None:
    """Characters outside Amberflo's dimension class become '_' one for one."""
    assert dimension_safe(raw) == wire


def test_dimension_values_are_cut_to_200_characters_and_empty_means_absent() -> None:
    """A long value is cut to the 200 characters Amberflo accepts; nothing left means absent."""
    assert dimension_safe("x" * 250) == "x" * 200
    assert dimension_safe("") is None


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (True, "true"),
        (np.bool_(False), "false"),
        (5, "5"),
        (np.int64(7), "7"),
        (450.0, "450.0"),
        (0.1 + 0.2, "0.30000000000000004"),
        (np.float32(2.5), "2.5"),
        (["b", "a", 3], "b,a,3"),
        ({"b": 1, "a": "x"}, '{"a":"x","b":1}'),
        (dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC), "2026-01-02T03:04:05+00:00"),
        ("as is", "as is"),
        (None, None),
        (math.nan, None),
        (pd.NA, None),
        (pd.NaT, None),
    ],
)
def test_format_value_renders_each_type_as_documented(value: object, text: str | None) -> None:
    """Values become the strings Amberflo stores; missing values become absent."""
    assert format_value(value) == text


def test_wire_value_formats_then_applies_the_dimension_rule() -> None:
    """A trait value is formatted and made dimension-safe in one step."""
    assert wire_value(["a/b", "c"]) == "a_b,c"
    assert wire_value(None) is None
    assert wire_value("|||") == "___"
