"""A deterministic sample shop: a catalog whose words make sense, and a month of events that follow
user tastes, so that recommendations are visibly sensible. Used by the README's first command.

Example: ``recs sample data/sample`` writes items.parquet, events.parquet and users.parquet there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

# category -> (products, qualities, uses). Every title and description is built from these words.
CATALOG = {
    "Running": (["running shoes", "trail running shoes", "racing flats", "running socks", "running jacket", "hydration vest"],
                ["breathable mesh upper", "cushioned midsole", "grippy lugged outsole", "reflective details", "lightweight build"],
                ["long road runs", "muddy mountain trails", "race day", "marathon training", "early morning jogs"]),
    "Kitchen": (["blender", "toaster", "air fryer", "stand mixer", "electric kettle", "chef's knife"],
                ["stainless steel body", "dishwasher-safe parts", "powerful motor", "non-stick coating", "compact countertop design"],
                ["smoothies and soups", "weeknight dinners", "baking bread", "crispy fries without oil", "quick breakfasts"]),
    "Camping": (["tent", "sleeping bag", "camping stove", "headlamp", "trekking poles", "camping backpack"],
                ["waterproof ripstop fabric", "three-season rating", "packable design", "aluminium frame", "storm-proof guy lines"],
                ["backcountry hiking", "family campsites", "alpine expeditions", "overnight treks", "festival weekends"]),
    "Coffee & Tea": (["espresso beans", "ground coffee", "green tea", "matcha powder", "pour-over dripper", "milk frother"],
                     ["single-origin roast", "rich chocolate notes", "organic leaves", "fine grind", "fair-trade sourcing"],
                     ["morning espresso", "slow weekend brewing", "afternoon tea", "iced lattes", "office coffee breaks"]),
    "Gaming": (["gaming mouse", "mechanical keyboard", "gaming headset", "game controller", "gaming monitor", "mouse pad"],
               ["RGB lighting", "low-latency wireless", "programmable buttons", "high refresh rate", "tactile switches"],
               ["competitive shooters", "long gaming sessions", "streaming", "console and PC play", "esports tournaments"]),
    "Gardening": (["garden hose", "pruning shears", "seed starter kit", "watering can", "raised garden bed", "compost bin"],
                  ["rust-resistant steel", "kink-free design", "cedar wood", "ergonomic grip", "weatherproof finish"],
                  ["vegetable patches", "balcony herbs", "rose pruning", "spring planting", "backyard composting"]),
    "Baby": (["stroller", "baby monitor", "diaper bag", "high chair", "baby carrier", "crib mattress"],
             ["one-hand fold", "soft organic cotton", "adjustable straps", "night vision camera", "easy-clean tray"],
             ["newborns", "toddler mealtimes", "city walks with baby", "safe sleep", "travel with infants"]),
    "Audio": (["wireless headphones", "bluetooth speaker", "noise-cancelling earbuds", "soundbar", "turntable", "studio microphone"],
              ["deep bass", "long battery life", "active noise cancellation", "crystal-clear vocals", "water-resistant shell"],
              ["commuting", "home cinema", "podcast recording", "vinyl listening", "parties by the pool"]),
    "Skincare": (["moisturizer", "sunscreen", "face serum", "gentle cleanser", "night cream", "lip balm"],
                 ["hyaluronic acid", "SPF 50 protection", "fragrance-free formula", "vitamin C", "non-comedogenic"],
                 ["dry skin", "sensitive skin", "daily sun protection", "overnight repair", "winter chapped lips"]),
    "Pets": (["dog leash", "cat tree", "orthopedic dog bed", "grain-free dog food", "cat litter", "chew toy"],
             ["durable nylon", "washable cover", "high-protein recipe", "odour control", "non-toxic rubber"],
             ["daily dog walks", "indoor cats", "senior dogs", "puppy training", "multi-cat homes"]),
    "Yoga & Fitness": (["yoga mat", "resistance bands", "adjustable dumbbells", "foam roller", "kettlebell", "jump rope"],
                       ["non-slip surface", "extra thick cushioning", "cast iron", "portable set", "quick weight change"],
                       ["home workouts", "morning yoga flows", "strength training", "muscle recovery", "cardio sessions"]),
    "Books": (["mystery novel", "science fiction novel", "cookbook", "travel guide", "biography", "fantasy saga"],
              ["page-turning plot", "award-winning author", "beautiful photography", "first edition hardcover", "bestselling series"],
              ["rainy weekends", "long flights", "book clubs", "planning a trip", "bedtime reading"]),
}
BRANDS = ["Northpeak", "Veloria", "Kestrel", "Brightwell", "Aurum", "Halden", "Ostara", "Quillon", "Tamsin", "Zephyr",
          "Lumen", "Corvid", "Marlowe", "Solstice", "Embergate", "Fjordline"]
ADJECTIVES = ["Pro", "Lite", "Classic", "Ultra", "Essential", "Prime", "Flex", "Max", "Air", "Edge"]
START = pd.Timestamp("2026-10-01T00:00:00Z")


def make_items(n_items: int, rng: np.random.Generator) -> pd.DataFrame:
    categories = list(CATALOG)
    rows = []
    for i in range(n_items):
        category = categories[i % len(categories)]
        products, qualities, uses = CATALOG[category]
        product = products[rng.integers(len(products))]
        q = rng.choice(len(qualities), 2, replace=False)
        use = uses[rng.integers(len(uses))]
        title = f"{BRANDS[rng.integers(len(BRANDS))]} {ADJECTIVES[rng.integers(len(ADJECTIVES))]} {product}"
        description = f"{product.capitalize()} with {qualities[q[0]]} and {qualities[q[1]]}. Made for {use}."
        rows.append({"item_id": f"I{i:05d}", "title": title, "description": description,
                     "category": category, "product": product, "price": round(float(rng.uniform(5, 300)), 2)})
    return pd.DataFrame(rows)


def make_events(items: pd.DataFrame, n_users: int, days: int, rng: np.random.Generator) -> pd.DataFrame:
    """Each user likes one to two categories and, inside them, a few product types; they browse mostly
    there (90%), put some views in the cart and buy some of those."""
    by_category = {c: g.index.to_numpy() for c, g in items.groupby("category")}
    categories = list(by_category)
    products = items["product"].to_numpy()
    item_ids = items["item_id"].to_numpy()
    popularity = 1.0 / np.arange(1, len(items) + 1) ** 0.8  # Zipf-like, in a shuffled item order
    popularity = popularity[rng.permutation(len(items))]
    events = []
    for u in range(n_users):
        user = f"U{u:05d}"
        liked = rng.choice(len(categories), rng.integers(1, 3), replace=False)
        liked_products = {c: set(rng.choice(CATALOG[categories[c]][0], 3, replace=False)) for c in liked}
        for _ in range(1 + rng.poisson(5)):
            session = START + pd.Timedelta(seconds=int(rng.integers(0, days * 86400)))
            if rng.random() < 0.9:
                c = liked[rng.integers(len(liked))]
                pool = by_category[categories[c]]
                taste = np.where(np.isin(products[pool], list(liked_products[c])), 4.0, 1.0)
            else:
                pool = np.arange(len(items))
                taste = np.ones(len(pool))
            p = popularity[pool] * taste
            for j, item in enumerate(rng.choice(pool, min(len(pool), 1 + rng.poisson(2)), replace=False, p=p / p.sum())):
                t = session + pd.Timedelta(minutes=3 * j)
                item_id = item_ids[item]
                events.append((user, item_id, t, "view"))
                if rng.random() < 0.25:
                    events.append((user, item_id, t + pd.Timedelta(minutes=1), "cart"))
                    if rng.random() < 0.5:
                        events.append((user, item_id, t + pd.Timedelta(minutes=2), "purchase"))
    frame = pd.DataFrame(events, columns=["user_id", "item_id", "timestamp", "event_type"])
    return frame.sort_values("timestamp", kind="stable").reset_index(drop=True)


def write_sample(out: Path | str, n_items: int = 3000, n_users: int = 1500, days: int = 30, seed: int = 42,
                 new_users: int = 20) -> dict[str, Path]:
    """Write the sample shop under `out`; `new_users` users exist with no events yet (they get a fallback).

    Returns the paths written. Same arguments, same files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items = make_items(n_items, rng)
    events = make_events(items, n_users, days, rng)
    users = pd.DataFrame({"user_id": [f"U{u:05d}" for u in range(n_users + new_users)]})
    paths = {"items": out / "items.parquet", "events": out / "events.parquet", "users": out / "users.parquet"}
    items.drop(columns=["product"]).to_parquet(paths["items"], index=False)
    events.to_parquet(paths["events"], index=False)
    users.to_parquet(paths["users"], index=False)
    return paths
