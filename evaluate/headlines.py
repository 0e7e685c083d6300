"""Crypto-news headlines written from templates, each labelled by the event it reports: the crypto register that
the tweet-trained sentiment adapter never sees (TFNS has 33 crypto rows in 9,543). Written here from what crypto news
reports (funding, listings, integrations, adoption, records on the good side; hacks, bans, lawsuits, collapses on
the bad; explainers, interviews, plans, price analysis and personnel news in between). No template copies a
CryptoLin row: its dev rows were read, as a dev set is for such choices, and its test rows never were; none of the
generated headlines is a dev headline (tests/test_headlines.py). Every name below is a common public one or
invented; the numbers are random.

    python -m evaluate.headlines --rows 3000 --out out/sentiment/data/crypto_headlines.jsonl
    from evaluate.headlines import headlines
    rows = headlines(3000, seed=0)   # [{"text", "label"}], the three labels in equal shares
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from evaluate.loaders import LABELS
from jsonl import write_jsonl

COINS = ("Bitcoin", "Ethereum", "Solana", "Cardano", "XRP", "Dogecoin", "Polkadot", "Avalanche", "Polygon",
         "Litecoin", "Chainlink", "Tezos", "Algorand", "Cosmos", "Tron", "Stellar", "Near", "Fantom", "Celo",
         "Shiba Inu", "Uniswap", "Aave", "Filecoin", "Monero", "Zcash", "Bitcoin Cash", "Ether", "BNB", "USDC")
EXCHANGES = ("Coinbase", "Binance", "Kraken", "Gemini", "OKX", "Bitstamp", "Huobi", "KuCoin", "Bitfinex", "Bybit",
             "Crypto.com", "Bittrex", "Gate.io", "eToro", "Robinhood", "Uniswap", "SushiSwap", "dYdX")
FIRMS = ("Visa", "Mastercard", "PayPal", "JPMorgan", "Goldman Sachs", "Fidelity", "BlackRock", "Morgan Stanley",
         "Deutsche Bank", "Citi", "BNY Mellon", "Square", "Tesla", "MicroStrategy", "Nasdaq", "CME Group", "Shopify",
         "Twitter", "Meta", "Microsoft", "Samsung", "Nike", "Adidas", "Starbucks", "Societe Generale", "UBS")
REGULATORS = ("the SEC", "the CFTC", "the FCA", "the DOJ", "the Treasury", "the Fed", "the OCC", "FinCEN",
              "the ECB", "the People's Bank of China", "Singapore's MAS", "Japan's FSA", "South Korea's FSC",
              "BaFin", "the New York DFS", "the IRS")
COUNTRIES = ("China", "India", "Russia", "Turkey", "Nigeria", "Brazil", "Argentina", "Germany", "Japan",
             "South Korea", "Thailand", "Ukraine", "El Salvador", "Switzerland", "Canada", "Australia", "Iran",
             "Kazakhstan", "Vietnam", "the UAE", "the UK", "the US", "Mexico", "Indonesia")
PEOPLE = ("Vitalik Buterin", "Changpeng Zhao", "Brian Armstrong", "Michael Saylor", "Elon Musk", "Jack Dorsey",
          "Cathie Wood", "Gary Gensler", "Charles Hoskinson", "Sam Bankman-Fried", "Mike Novogratz",
          "Janet Yellen", "Jerome Powell", "Christine Lagarde", "Tyler Winklevoss", "Anatoly Yakovenko")
VCS = ("Andreessen Horowitz", "a16z", "Paradigm", "Sequoia", "Pantera Capital", "Polychain", "Coinbase Ventures",
       "Multicoin Capital", "Galaxy Digital", "Digital Currency Group", "Tiger Global", "SoftBank", "Jump Crypto")
TOPICS = ("DeFi", "NFTs", "stablecoins", "the metaverse", "Web3", "layer-2 scaling", "crypto lending",
          "bitcoin mining", "DAOs", "central bank digital currencies", "crypto custody", "GameFi", "staking")
_PREFIX = ("Nova", "Arc", "Blue", "Zen", "Flux", "Orbit", "Terra", "Prime", "Hex", "Luma", "Vault", "Chain", "Meta",
           "Open", "Star", "Iron", "Echo", "Pixel", "Delta", "Quantum", "Solid", "Bright", "North", "Swift")
_SUFFIX = ("Labs", "Finance", "Protocol", "Pay", "Capital", "Swap", "Chain", "Network", "DAO", "Markets", "Wallet",
           "Digital", "Exchange", "Technologies", "Games", "Mint", "Ventures", "Bridge", "Custody", "X")
_KIND = ("crypto startup", "DeFi protocol", "NFT marketplace", "blockchain gaming studio", "Web3 platform",
         "crypto wallet", "stablecoin issuer", "crypto lender", "layer-2 network", "crypto exchange",
         "bitcoin miner", "crypto custodian", "analytics firm", "crypto payments firm", "metaverse project")

# (label, template): {slot} names a filler list or a number below; labels say whether the news is good or bad for
# the subject and for crypto, the way a crypto-news reader judges a headline
TEMPLATES = (
    ("positive", "{new} raises ${m} million in Series {round} funding led by {vc}"),
    ("positive", "{kind} {new} raises ${m} million to expand into {country}"),
    ("positive", "{new} closes ${m} million seed round with backing from {vc}"),
    ("positive", "{exchange} to list {coin} as trading volume soars"),
    ("positive", "{exchange} adds support for {coin} and {coin2}"),
    ("positive", "{firm} to let customers buy, hold and sell {coin}"),
    ("positive", "{firm} now accepts {coin} payments at millions of merchants"),
    ("positive", "{firm} partners with {new} to bring crypto payments to its users"),
    ("positive", "{firm} launches {coin} fund for institutional clients"),
    ("positive", "{firm} buys ${m} million worth of {coin}"),
    ("positive", "{coin} surges {pct}% to a new all-time high"),
    ("positive", "{coin} jumps above ${price} as buyers return"),
    ("positive", "{coin} rallies {pct}% after {firm} announcement"),
    ("positive", "{regulator} approves first {coin} ETF"),
    ("positive", "{country} passes law recognising {coin} as legal tender"),
    ("positive", "{country} lawmakers approve clear rules for crypto exchanges, boosting the industry"),
    ("positive", "{new} mainnet goes live after successful testnet"),
    ("positive", "{coin} network upgrade completes smoothly, cutting fees by {pct}%"),
    ("positive", "{coin} hash rate hits record high as miners expand"),
    ("positive", "NFT collection from {new} sells out in minutes, raising ${m} million"),
    ("positive", "{person} says {coin} is on its way to mainstream adoption"),
    ("positive", "DeFi protocol {new} hits ${b} billion in total value locked"),
    ("positive", "Monthly {coin} trading volume hits record ${b} billion"),
    ("positive", "{exchange} wins license to operate in {country}"),
    ("positive", "{firm} integrates {coin} into its app for {m} million users"),
    ("positive", "{kind} {new} doubles its user base to {m} million"),
    ("positive", "{vc} launches ${m} million fund to back {topic} startups"),
    ("positive", "{firm} to offer crypto custody to its wealth management clients"),
    ("positive", "{new} teams up with {firm} to build {topic} products"),
    ("positive", "{coin} developers ship long-awaited upgrade, price climbs {pct}%"),
    ("negative", "{exchange} hacked, ${m} million in {coin} stolen"),
    ("negative", "DeFi protocol {new} exploited for ${m} million"),
    ("negative", "Hackers drain ${m} million from {new} bridge"),
    ("negative", "{regulator} sues {exchange} over unregistered securities offering"),
    ("negative", "{regulator} charges founders of {new} with defrauding investors"),
    ("negative", "{regulator} fines {exchange} ${m} million for anti-money-laundering failures"),
    ("negative", "{country} bans cryptocurrency trading and mining"),
    ("negative", "{country} orders crypto miners to shut down"),
    ("negative", "{coin} plunges {pct}% as sell-off deepens"),
    ("negative", "{coin} crashes below ${price}, wiping out ${b} billion"),
    ("negative", "{coin} slides {pct}% after {exchange} outage"),
    ("negative", "{kind} {new} files for bankruptcy"),
    ("negative", "{exchange} halts withdrawals amid liquidity crisis"),
    ("negative", "{regulator} rejects proposed {coin} ETF"),
    ("negative", "{regulator} delays decision on {coin} ETF again"),
    ("negative", "{kind} {new} lays off {pct}% of its staff"),
    ("negative", "{new} shuts down after failing to raise funds"),
    ("negative", "Investors lose ${m} million in {new} rug pull"),
    ("negative", "{new} founder arrested over alleged Ponzi scheme"),
    ("negative", "{firm} drops plans to accept {coin} over environmental concerns"),
    ("negative", "{coin} network suffers hours-long outage"),
    ("negative", "Critical bug in {new} puts user funds at risk"),
    ("negative", "{firm} reports ${m} million loss on its {coin} holdings"),
    ("negative", "{country} central bank warns banks against serving crypto firms"),
    ("negative", "{exchange} delists {coin} under regulatory pressure"),
    ("negative", "{person} calls {coin} a bubble, says it will go to zero"),
    ("negative", "Scammers impersonating {person} steal ${m} million in {coin}"),
    ("negative", "Stablecoin {new} loses its dollar peg, falls to ${cents} cents"),
    ("negative", "{exchange} faces class action over frozen accounts"),
    ("negative", "{coin} miners capitulate as revenue falls {pct}%"),
    ("neutral", "What is {coin}? A beginner's guide"),
    ("neutral", "How to stake {coin} on {exchange}"),
    ("neutral", "Explained: how {topic} work"),
    ("neutral", "{person} on the future of {topic}"),
    ("neutral", "Interview: {person} talks {coin}, regulation and {topic}"),
    ("neutral", "{regulator} to hold hearing on {topic} next week"),
    ("neutral", "{regulator} publishes consultation on {topic} rules"),
    ("neutral", "{coin} price analysis: key levels to watch this week"),
    ("neutral", "{coin} trades flat near ${price} ahead of Fed meeting"),
    ("neutral", "Weekly recap: {coin}, {coin2} and the week in {topic}"),
    ("neutral", "{new} appoints former {firm} executive as chief financial officer"),
    ("neutral", "{kind} {new} moves its headquarters to {country}"),
    ("neutral", "Why {firm} is looking at {topic}"),
    ("neutral", "{country} central bank to study a digital currency"),
    ("neutral", "The state of {topic} in {year}"),
    ("neutral", "{pct}% of investors in {country} hold crypto, survey finds"),
    ("neutral", "{firm} executives to testify before Congress on {topic}"),
    ("neutral", "{exchange} publishes its quarterly transparency report"),
    ("neutral", "A look inside the {coin} ecosystem with {person}"),
    ("neutral", "{coin} and {coin2}: what sets them apart"),
    ("neutral", "{regulator} official to speak at {topic} conference"),
    ("neutral", "{new} releases the whitepaper for its {topic} protocol"),
    ("neutral", "{coin} options worth ${b} billion expire on Friday"),
    ("neutral", "{person} to step down as chief executive of {new}, stays on the board"),
    ("neutral", "Podcast: {person} on {topic} and what comes next"),
    ("neutral", "{firm} files trademark applications mentioning {topic}"),
    ("neutral", "{country} to review its tax treatment of crypto gains"),
    ("neutral", "{coin} developers schedule next upgrade for {month}"),
    ("neutral", "{exchange} changes its fee schedule for {coin} trading"),
    ("neutral", "Opinion: {topic} need better user experience"),
    ("positive", "{firm} files to launch a spot {coin} ETF"),
    ("positive", "{new} token soars {pct}% on its trading debut"),
    ("positive", "{country} to allow banks to hold and trade crypto"),
    ("positive", "{exchange} sees record sign-ups as {coin} rebounds"),
    ("positive", "{coin} ETF draws ${m} million on its first day"),
    ("positive", "{firm} completes its first {coin}-settled bond trade"),
    ("positive", "{exchange} cuts trading fees to zero for {coin} pairs"),
    ("positive", "{firm} hires crypto veteran to build out its digital asset unit"),
    ("positive", "Institutional inflows into {coin} funds reach ${m} million in a week"),
    ("positive", "{new} wins a ${m} million grant from the {coin} foundation"),
    ("positive", "{coin} breaks out as open interest climbs to a record"),
    ("positive", "{firm} adds {coin} to its balance sheet"),
    ("negative", "{coin} funds see record outflows of ${m} million"),
    ("negative", "{firm} sells its entire {coin} stake at a loss"),
    ("negative", "{new} token collapses {pct}% after insiders dump holdings"),
    ("negative", "{regulator} freezes the assets of {new}"),
    ("negative", "{exchange} suspends service in {country} after its license is revoked"),
    ("negative", "Fees spike and transactions stall as {coin} network congests"),
    ("negative", "{new} founder sentenced to prison for crypto fraud"),
    ("negative", "Tax authorities in {country} raid crypto firms"),
    ("negative", "Ransomware gang demands ${m} million in {coin}"),
    ("negative", "{firm} blocks customers from buying crypto, citing risks"),
    ("negative", "{coin} liquidations top ${m} million as leveraged traders are wiped out"),
    ("negative", "Phishing attack on {exchange} users drains ${m} million"),
    ("neutral", "{firm} to report quarterly results on Thursday"),
    ("neutral", "{coin} daily chart: what traders are watching"),
    ("neutral", "Explainer: what the next {coin} upgrade changes"),
    ("neutral", "{exchange} to undergo scheduled maintenance on Sunday"),
    ("neutral", "{new} to hold its token sale in {month}"),
    ("neutral", "{regulator} seeks public comment on {topic}"),
    ("neutral", "{person} joins {new} as an adviser"),
    ("neutral", "{kind} {new} rebrands and changes its ticker"),
    ("neutral", "Survey: how institutions view {coin} in {year}"),
    ("neutral", "{coin} futures open interest holds steady at ${b} billion"),
    ("neutral", "What {topic} mean for investors, explained"),
    ("neutral", "{country} lawmakers debate a draft crypto bill"),
)
_SOURCES = ("", "", "", "", ": report", " - sources", ", report says", ": Bloomberg", " (updated)")
_MONTHS = ("January", "March", "May", "July", "September", "November", "Q2", "Q4")


def _firm_name(rng: random.Random) -> str:
    return f"{rng.choice(_PREFIX)}{rng.choice(_SUFFIX)}" if rng.random() < 0.5 else \
        f"{rng.choice(_PREFIX)} {rng.choice(_SUFFIX)}"


def _fill(template: str, rng: random.Random) -> str:
    coin = rng.choice(COINS)
    slots = {"coin": coin, "coin2": rng.choice([c for c in COINS if c != coin]), "exchange": rng.choice(EXCHANGES),
             "firm": rng.choice(FIRMS), "regulator": rng.choice(REGULATORS), "country": rng.choice(COUNTRIES),
             "person": rng.choice(PEOPLE), "vc": rng.choice(VCS), "topic": rng.choice(TOPICS),
             "new": _firm_name(rng), "kind": rng.choice(_KIND).capitalize(), "round": rng.choice("ABCD"),
             "m": rng.choice((2, 3.5, 5, 7.2, 10, 12, 15, 20, 25, 40, 50, 80, 100, 150, 200, 300, 600)),
             "b": rng.choice((1.2, 2, 3.4, 5, 8, 10, 20, 45, 100)),
             "pct": rng.choice((3, 5, 8, 10, 12, 15, 20, 30, 40, 50)),
             "price": rng.choice(("1", "2", "50", "100", "2,000", "3,000", "20,000", "30,000", "50,000", "60,000")),
             "cents": rng.choice((60, 70, 80, 90, 95)), "year": rng.choice(range(2018, 2023)),
             "month": rng.choice(_MONTHS)}
    text = template.format(**slots)
    # a headline starts upper case, except names that do not (eToro, dYdX)
    return text if text[1:2].isupper() else text[0].upper() + text[1:]


def _surface(text: str, rng: random.Random) -> str:
    """Headline surface variation: a source tag now and then, Title Case in about a third of them."""
    text += rng.choice(_SOURCES)
    if rng.random() < 0.35:
        text = re.sub(r"\b([a-z])", lambda m: m.group(1).upper(), text)
    return text


def headlines(rows: int, seed: int = 0) -> list[dict]:
    """`rows` distinct {text, label} headlines, the three labels in equal shares (seeded)."""
    rng = random.Random(seed)
    by_label = {lab: [t for lab2, t in TEMPLATES if lab2 == lab] for lab in LABELS}
    out, seen, misses = [], set(), 0
    while len(out) < rows:
        label = LABELS[len(out) % 3]
        text = _surface(_fill(rng.choice(by_label[label]), rng), rng)
        if text in seen:
            misses += 1
            if misses > 1000:  # 1,000 repeats in a row: the templates are used up
                raise ValueError(f"the templates cannot give {rows} distinct headlines (stuck at {len(out)})")
            continue
        seen.add(text)
        out.append({"text": text, "label": label})
        misses = 0
    rng.shuffle(out)
    return out


@dataclass
class HeadlineArgs:
    out: str = field(default="out/crypto_headlines.jsonl", metadata={"help": "JSONL file of {text, label} rows"})
    rows: int = field(default=3000, metadata={"help": "headlines to write (equal shares of the three labels)"})
    seed: int = field(default=0, metadata={"help": "seed for the template and slot choices"})

    def __post_init__(self):
        if self.rows < 1:
            raise ValueError(f"rows={self.rows} must be >= 1")


def main(argv: list[str] | None = None) -> None:
    from cli import parse_args
    (args,) = parse_args(argv, HeadlineArgs, description=__doc__)
    write_jsonl(args.out, headlines(args.rows, args.seed), ensure_ascii=True)
    print(f"{args.rows} headlines -> {args.out}")


if __name__ == "__main__":
    main()
