-- The tokens a feature fires on most often: count of activations per token string, its share of
-- the feature's activations, and the mean and max activation on that token.
-- @param sae VARCHAR: SAE name (or give layer=L [model=KEY] to use that layer's only encoded SAE)
-- @param feature INTEGER: feature index
-- @param n INTEGER = 20: tokens to return
WITH act AS (
    SELECT f.value, t.token
    FROM features AS f JOIN tokens AS t ON t.row = f.row
    WHERE f.sae = $sae AND f.feature = $feature
)
SELECT
    token,
    count(*) AS n_active,
    count(*) / sum(count(*)) OVER () AS share,
    avg(value) AS mean_value,
    max(value) AS max_value
FROM act
GROUP BY token
ORDER BY n_active DESC, max_value DESC, token
LIMIT $n
