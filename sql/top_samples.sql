-- Samples where one feature fires most: its maximum over the sample's tokens, how many of the
-- sample's tokens it is active on, the token at the maximum, and the start of the text.
-- @param sae VARCHAR: SAE name (or give layer=L [model=KEY] to use that layer's only encoded SAE)
-- @param feature INTEGER: feature index
-- @param n INTEGER = 20: samples to return
WITH act AS (
    SELECT f.row, f.value, t.sample, t.token
    FROM features AS f JOIN tokens AS t ON t.row = f.row
    WHERE f.sae = $sae AND f.feature = $feature
),
per_sample AS (
    SELECT
        sample,
        max(value) AS max_value,
        count(*) AS n_active,
        sum(value) AS sum_value,
        arg_max(token, value) AS top_token
    FROM act
    GROUP BY sample
)
SELECT
    row_number() OVER (ORDER BY p.max_value DESC, p.sample) AS rank,
    p.max_value,
    p.n_active,
    s.n_tokens,
    p.sum_value,
    p.top_token,
    s.sample,
    s.id,
    s.label,
    left(s.text, 160) AS text
FROM per_sample AS p
JOIN samples AS s ON s.sample = p.sample
ORDER BY p.max_value DESC, p.sample
LIMIT $n
